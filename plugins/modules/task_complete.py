#!/usr/bin/python
# -*- coding: utf-8 -*-

# Copyright: cicc.cloud contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: task_complete
version_added: 0.1.0
short_description: Mark a claimed task of the cicc.cloud S3 work queue completed
description:
  - Records a task claimed with M(cicc.cloud.task_claim) as completed, if the lease is still the one O(etag)
    names. Its lock becomes the task's finished mark, which M(cicc.cloud.task_info) with
    O(cicc.cloud.task_info#module:compact=true) or the workers fold into C(completed.txt).
  - A task is done when its manifest (C(manifests/<name>.json) under the prefix) exists; the boot worker writes it
    once it has published the task's outputs. Give O(outputs) for a task whose outputs were published by other means;
    each must exist in the bucket, and the module writes the manifest listing them (key, size, ETag). Without a
    manifest or existing outputs the module fails and nothing is written.
  - Completing a task that is already recorded completed (marked, or listed in C(completed.txt)) changes nothing.
  - The protocol is the one the boot worker runs (C(plugins/module_utils/task_queue.py)); this module only
    adapts it.
  - O(lease_seconds) and O(max_attempts) are the ones given to M(cicc.cloud.task_claim).
author:
  - cicc.cloud developers (!UNKNOWN)
options:
  outputs:
    description:
      - Keys of the task's outputs, relative to O(prefix), for a task that has no manifest yet.
      - Ignored when the task has a manifest already.
    type: list
    elements: str
    default: []
extends_documentation_fragment:
  - cicc.cloud.attributes
  - cicc.cloud.task_queue.location
  - cicc.cloud.task_queue
  - cicc.cloud.task_queue.lease
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
seealso:
  - module: cicc.cloud.task_claim
  - module: cicc.cloud.task_release
  - module: cicc.cloud.task_info
"""

EXAMPLES = r"""
- name: Claim the next task
  cicc.cloud.task_claim:
    bucket: cicc-demo-bucket
    owner: operator
  register: claim

- name: Complete it once its output is uploaded
  cicc.cloud.task_complete:
    bucket: cicc-demo-bucket
    outputs: ["out{{ claim.task.name[2:] }}"]
    name: "{{ claim.task.name }}"
    owner: "{{ claim.task.owner }}"
    token: "{{ claim.task.token }}"
    etag: "{{ claim.task.etag }}"
    attempts: "{{ claim.task.attempts }}"
  when: claim.claimed
"""

RETURN = r"""
task:
  description: The completed task.
  returned: success
  type: dict
  contains:
    name:
      description: Name of the task.
      type: str
      returned: success
      sample: in3.dat
    state:
      description: State of the task, always V(completed).
      type: str
      returned: success
      sample: completed
    manifest:
      description: Key of the task's manifest in the bucket.
      type: str
      returned: success
      sample: manifests/in3.dat.json
    outputs:
      description: Keys of the task's outputs, as its manifest lists them.
      type: list
      elements: str
      returned: success
      sample: [out3.dat]
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
    argument_spec = dict(QUEUE_ARGUMENT_SPEC, **LEASE_ARGUMENT_SPEC)
    argument_spec.update(outputs=dict(type="list", elements="str", default=[]))

    module = AnsibleAWSModule(argument_spec=argument_spec, supports_check_mode=True)

    queue = queue_from_params(module.params)
    lease = lease_from_params(module.params)
    client = s3_client(module)

    with queue_errors(module, queue, f"complete task {lease.name}"):
        task_queue.check_name(lease.name)
        task = {"name": lease.name, "state": "completed", "manifest": queue.manifest_key(lease.name)}
        manifest = task_queue.read_manifest(client, queue, lease.name)
        written = manifest is not None
        if not written:
            if not module.params["outputs"]:
                module.fail_json(msg=f"task {lease.name} has no manifest: name its outputs (outputs) to write one")
            files = task_queue.describe_outputs(client, queue, [queue.key(key) for key in module.params["outputs"]])
            manifest = {"files": files, "owner": lease.owner}
        task["outputs"] = [entry["key"] for entry in manifest.get("files", [])]
        if task_queue.recorded_completed(client, queue, lease.name):
            module.exit_json(changed=False, task=task)
        if not module.check_mode:
            if not written:
                task_queue.publish_manifest(client, queue, lease, manifest)
            task_queue.complete(client, queue, lease)
    module.exit_json(changed=True, task=task)


if __name__ == "__main__":
    main()
