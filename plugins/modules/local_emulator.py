#!/usr/bin/python
# -*- coding: utf-8 -*-

# Copyright: cicc.cloud contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: local_emulator
version_added: 0.6.0
short_description: Start or stop the local cloud's AWS emulator, a moto server on 127.0.0.1
description:
  - With O(state=started), starts a moto server on 127.0.0.1:O(port) unless one answers there already (whoever
    started it), and waits until it answers. It runs on, detached, after the play; its pid file and log are under
    O(state_dir).
  - With O(state=stopped), stops the server this module (or C(scripts/emulator.sh)) started on O(port); one started
    otherwise is left alone. Its state (every bucket, instance and image it held) is lost.
  - Every step playbook runs it with O(state=started) when C(cicc_target) is C(local), so the local pipeline needs
    no emulator started by hand.
author:
  - cicc.cloud developers (!UNKNOWN)
options:
  state:
    description:
      - V(started) to have the emulator answer, V(stopped) to stop it.
    type: str
    choices: [started, stopped]
    default: started
  port:
    description:
      - Its port on 127.0.0.1.
    type: int
    default: 5000
  state_dir:
    description:
      - Where its pid file (C(emulator-PORT.pid)) and log (C(emulator-PORT.log)) are kept.
    type: path
    default: ~/.cache/cicc
extends_documentation_fragment:
  - cicc.cloud.attributes
attributes:
  action_group:
    description: Not in C(group/cicc.cloud.aws), whose AWS options it does not take.
    support: none
    membership: []
requirements:
  - moto with its server (C(pip install 'moto[server]')), in the Python environment the module runs in
notes:
  - The server is the C(moto_server) next to the module's Python interpreter, with AWS's managed IAM policies
    loaded (C(MOTO_IAM_LOAD_MANAGED_POLICIES=true)).
seealso:
  - module: cicc.cloud.local_instances
"""

EXAMPLES = r"""
- name: Have the local cloud's emulator answer on 127.0.0.1:5000
  cicc.cloud.local_emulator:
    port: 5000

- name: Stop it (every bucket, instance and image it held is lost)
  cicc.cloud.local_emulator:
    state: stopped
"""

RETURN = r"""
url:
  description: The emulator's endpoint.
  returned: always
  type: str
  sample: http://127.0.0.1:5000
pid:
  description: The server's pid when this module or C(scripts/emulator.sh) started it; null otherwise.
  returned: always
  type: int
  sample: 4242
log:
  description: The server's log, when this module started it.
  returned: always
  type: str
  sample: /root/.cache/cicc/emulator-5000.log
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.cicc.cloud.plugins.module_utils import emulator


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", choices=["started", "stopped"], default="started"),
            port=dict(type="int", default=emulator.DEFAULT_PORT),
            state_dir=dict(type="path", default=emulator.DEFAULT_STATE_DIR),
        ),
        supports_check_mode=True,
    )
    port, state_dir = module.params["port"], module.params["state_dir"]
    now = emulator.status(port, state_dir)
    result = {"url": now["url"], "pid": now["pid"], "log": now["log"]}
    try:
        if module.params["state"] == "started":
            if now["answers"]:
                module.exit_json(changed=False, **result)
            if not module.check_mode:
                result["pid"] = emulator.start(port, state_dir)["pid"]
        else:
            if now["pid"] is None:
                module.exit_json(changed=False, **result)
            if not module.check_mode:
                emulator.stop(port, state_dir)
                result["pid"] = None
    except emulator.EmulatorError as error:
        module.fail_json(msg=f"The local cloud's emulator on port {port}: {error}", **result)
    module.exit_json(changed=True, **result)


if __name__ == "__main__":
    main()
