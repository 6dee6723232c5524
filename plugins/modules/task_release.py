#!/usr/bin/python
# -*- coding: utf-8 -*-

# Copyright: cicc.cloud contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: task_release
version_added: 0.1.0
short_description: Give back a claimed task of the cicc.cloud S3 work queue, or record it failed
description:
  - Gives back a task claimed with M(cicc.cloud.task_claim), so that the next claim takes it.
  - Without O(error) the attempt does not count (the work was interrupted, not wrong).
  - With O(error) the attempt counts and O(error) is kept as the reason. Once O(max_attempts) attempts failed, the
    task is recorded failed with that reason (C(failed/<name>.json), and C(failed.txt) after compaction) and is no
    longer claimed.
  - With O(state=failed) the task is recorded failed at once, O(error) being the reason; use it when no retry can
    help (a bad input).
  - Only the lease O(etag) names is given back. A lease that is no longer the lock's (it expired and another owner
    took the task over) makes the module fail without writing.
  - The protocol is the one the boot worker runs (C(plugins/module_utils/task_queue.py)); this module only
    adapts it.
  - O(lease_seconds) is the one given to M(cicc.cloud.task_claim).
author:
  - cicc.cloud developers (!UNKNOWN)
options:
  error:
    description:
      - Why the attempt failed. When set, the attempt counts towards O(max_attempts).
      - Required with O(state=failed), as the reason recorded.
    type: str
  state:
    description:
      - V(released) gives the task back for another attempt (or records it failed once its attempts are used up).
      - V(failed) records the task failed for good, with O(error) as the reason.
    default: released
    choices: [released, failed]
    type: str
extends_documentation_fragment:
  - cicc.cloud.attributes
  - cicc.cloud.task_queue.location
  - cicc.cloud.task_queue
  - cicc.cloud.task_queue.lease
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
attributes:
  idempotent:
    support: full
    details:
      - A lease this claim already gave back, or a task already recorded failed, is reported with no change.
seealso:
  - module: cicc.cloud.task_claim
  - module: cicc.cloud.task_complete
  - module: cicc.cloud.task_info
"""

EXAMPLES = r"""
- name: Claim the next task
  cicc.cloud.task_claim:
    bucket: cicc-demo-bucket
    owner: operator
  register: claim

- name: Give it back after a failed attempt (recorded failed after max_attempts)
  cicc.cloud.task_release:
    bucket: cicc-demo-bucket
    name: "{{ claim.task.name }}"
    owner: "{{ claim.task.owner }}"
    token: "{{ claim.task.token }}"
    etag: "{{ claim.task.etag }}"
    attempts: "{{ claim.task.attempts }}"
    error: "the container exited with status 1"

- name: Record it failed for good
  cicc.cloud.task_release:
    bucket: cicc-demo-bucket
    name: "{{ claim.task.name }}"
    owner: "{{ claim.task.owner }}"
    token: "{{ claim.task.token }}"
    etag: "{{ claim.task.etag }}"
    state: failed
    error: "input is empty"
"""

RETURN = r"""
task:
  description: The task given back.
  returned: success
  type: dict
  contains:
    name:
      description: Name of the task.
      type: str
      returned: success
      sample: in3.dat
    state:
      description: V(pending) when the task will be claimed again, V(failed) when it is recorded failed.
      type: str
      returned: success
      sample: pending
"""

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule

from ansible_collections.cicc.cloud.plugins.module_utils import task_queue
from ansible_collections.cicc.cloud.plugins.module_utils.task_module import LEASE_ARGUMENT_SPEC
from ansible_collections.cicc.cloud.plugins.module_utils.task_module import QUEUE_ARGUMENT_SPEC
from ansible_collections.cicc.cloud.plugins.module_utils.task_module import lease_from_params
from ansible_collections.cicc.cloud.plugins.module_utils.task_module import queue_errors
from ansible_collections.cicc.cloud.plugins.module_utils.task_module import queue_from_params
from ansible_collections.cicc.cloud.plugins.module_utils.task_module import s3_client


def main():
    argument_spec = dict(
        QUEUE_ARGUMENT_SPEC,
        **LEASE_ARGUMENT_SPEC,
        error=dict(type="str"),
        state=dict(type="str", default="released", choices=["released", "failed"]),
    )

    module = AnsibleAWSModule(
        argument_spec=argument_spec, supports_check_mode=True, required_if=[("state", "failed", ["error"])]
    )

    params = module.params
    if params["state"] == "failed" and not params["error"]:
        module.fail_json(msg="state=failed needs the reason in error")
    queue = queue_from_params(params)
    lease = lease_from_params(params)
    client = s3_client(module)

    with queue_errors(module, queue, f"release task {lease.name}"):
        task_queue.check_name(lease.name)
        state = task_queue.released_state(client, queue, lease)
        if state is not None:
            module.exit_json(changed=False, task={"name": lease.name, "state": state})
        if module.check_mode:
            state = task_queue.release_outcome(queue, lease, params["error"] or "", params["state"] == "failed")
        elif params["state"] == "failed":
            task_queue.fail(client, queue, lease, params["error"])
            state = "failed"
        else:
            state = task_queue.release(client, queue, lease, params["error"] or "")
    module.exit_json(changed=True, task={"name": lease.name, "state": state})


if __name__ == "__main__":
    main()
