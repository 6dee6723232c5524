#!/usr/bin/python
# -*- coding: utf-8 -*-

# Copyright: cicc.cloud contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: task_info
version_added: 0.1.0
short_description: Show the state of the cicc.cloud S3 work queue
description:
  - Reads the work queue kept under O(prefix) in O(bucket) - C(tasklist.txt), the lists of finished tasks and the
    locks (a finished task's lock is its finished mark until a compaction folds it) - and returns its state as RV(queue) -
    what is pending, who holds what and for how long, what is completed or failed.
  - Finished tasks are counted as soon as they are marked, so the counts are exact at any time.
  - With O(compact=true) the finished marks are first folded into C(completed.txt) and C(failed.txt), finished names and
    lines that are not task names are taken out of C(tasklist.txt) (the latter recorded in C(rejected.txt)), as the
    workers do when the queue is drained. Only then does the module write.
  - The protocol is the one the boot worker runs (C(plugins/module_utils/task_queue.py)); this module only
    adapts it.
  - O(lease_seconds) serves only for locks that do not record their own lease length. O(max_attempts) is the one
    given to M(cicc.cloud.task_claim).
author:
  - cicc.cloud developers (!UNKNOWN)
options:
  compact:
    description:
      - Fold the finished marks into the lists before reading the queue (waiting for a compaction a worker is
        running to end first). This writes to the bucket (not in check mode).
    default: false
    type: bool
  check_outputs:
    description:
      - Check every completed task's outputs against its manifest (each file it lists there, with the ETag it lists)
        and what they were made from (its input, the shared files and the image), and return the result as RV(outputs).
        Read-only.
    default: false
    type: bool
  check_xor:
    description:
      - For the clinic's XOR job, also recompute every completed task's output as its input XOR the job's kernel (its
        first shared file), here and independently of the container that made it, and add what differs to
        RV(outputs.wrong). The job is read from C(<prefix>job.json) (the job step writes it). Read-only.
      - Implies O(check_outputs=true).
    default: false
    type: bool
extends_documentation_fragment:
  - cicc.cloud.attributes
  - cicc.cloud.task_queue.location
  - cicc.cloud.task_queue
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
attributes:
  check_mode:
    support: full
    details:
      - With O(compact=true) in check mode, the module reports whether compaction would change anything and
        returns the queue as it is.
seealso:
  - module: cicc.cloud.task_claim
  - module: cicc.cloud.task_complete
  - module: cicc.cloud.task_release
"""

EXAMPLES = r"""
- name: Show the progress of the queue
  cicc.cloud.task_info:
    bucket: cicc-demo-bucket
  register: status

- name: Fold the finished tasks into the lists, then show the queue
  cicc.cloud.task_info:
    bucket: cicc-demo-bucket
    compact: true
  register: status

- name: Wait until every task is finished
  cicc.cloud.task_info:
    bucket: cicc-demo-bucket
  register: status
  until: status.queue.drained
  retries: 60
  delay: 10
"""

RETURN = r"""
queue:
  description: The state of the queue.
  returned: always
  type: dict
  contains:
    pending:
      description: Number of tasks still to do (claimed ones included).
      type: int
      returned: always
      sample: 4
    pending_tasks:
      description: Names of the tasks still to do, in C(tasklist.txt) order.
      type: list
      elements: str
      returned: always
      sample: ["in6.dat", "in7.dat", "in8.dat", "in9.dat"]
    claimed:
      description: Number of locks.
      type: int
      returned: always
      sample: 1
    claims:
      description: The locks, one per claimed task.
      type: list
      elements: dict
      returned: always
      contains:
        task:
          description: Name of the task.
          type: str
          returned: always
          sample: in6.dat
        owner:
          description: Owner of the lease.
          type: str
          returned: always
          sample: worker-1
        instance_id:
          description: Instance id the claim recorded.
          type: str
          returned: always
          sample: i-0123456789abcdef0
        attempts:
          description: Attempt number of the claim.
          type: int
          returned: always
          sample: 1
        lease_age_seconds:
          description: Seconds since the lock was last written, by S3's clock.
          type: float
          returned: always
          sample: 12.0
        expired:
          description: Whether the lease expired, so that another claim may take the task over.
          type: bool
          returned: always
          sample: false
    completed:
      description: Number of tasks completed.
      type: int
      returned: always
      sample: 5
    failed:
      description: Number of tasks recorded failed.
      type: int
      returned: always
      sample: 1
    completed_tasks:
      description: Names of the tasks completed, sorted.
      type: list
      elements: str
      returned: always
      sample: ["in3.dat"]
    failed_tasks:
      description: Names of the tasks recorded failed, sorted.
      type: list
      elements: str
      returned: always
      sample: ["in5.dat"]
    rejected:
      description: Lines of C(tasklist.txt) that are not task names, with the reason.
      type: list
      elements: dict
      returned: always
      contains:
        line:
          description: The line, without surrounding spaces.
          type: str
          returned: always
          sample: ../etc/passwd
        reason:
          description: Why it is not a task name.
          type: str
          returned: always
          sample: contains a path separator; task names are plain object names in the queue prefix
    unfolded:
      description: Number of finished tasks not yet folded into the lists (their locks are their finished marks).
      type: int
      returned: always
      sample: 0
    drained:
      description: Whether nothing is pending or claimed any more.
      type: bool
      returned: always
      sample: false
outputs:
  description: The completed tasks' outputs checked against their manifests.
  returned: when O(check_outputs=true) or O(check_xor=true)
  type: dict
  contains:
    checked:
      description: Completed tasks whose manifest was checked.
      type: int
      returned: always
      sample: 7
    without_manifest:
      description: Completed tasks with no manifest (outputs made before manifests existed, or by hand).
      type: list
      elements: str
      returned: always
      sample: ["in0.dat"]
    wrong:
      description:
        - What is wrong, one line per output missing or changed since it was published (and with O(check_xor=true),
          per output that is not its input XOR the kernel).
      type: list
      elements: str
      returned: always
      sample: []
    stale:
      description:
        - Completed tasks whose outputs were made from another input, shared file or image than the job's now (the
          image the newest manifest names), each with why. They are reported, never recomputed.
      type: list
      elements: dict
      returned: always
      sample: [{"task": "in3.dat", "why": "input in3.dat changed since"}]
compacted:
  description: What the compaction moved into the lists.
  returned: when O(compact=true), outside check mode
  type: dict
  contains:
    completed:
      description: Names added to C(completed.txt).
      type: int
      returned: always
      sample: 3
    failed:
      description: Names added to C(failed.txt).
      type: int
      returned: always
      sample: 0
    rejected:
      description: Lines of C(tasklist.txt) that are not task names, moved to C(rejected.txt).
      type: int
      returned: always
      sample: 0
    locks:
      description: Locks left on finished tasks (their worker stopped before letting go), deleted.
      type: int
      returned: always
      sample: 0
"""

import json

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule

from ansible_collections.cicc.cloud.plugins.module_utils import dataset
from ansible_collections.cicc.cloud.plugins.module_utils import job as jobs
from ansible_collections.cicc.cloud.plugins.module_utils import task_queue
from ansible_collections.cicc.cloud.plugins.module_utils.task_module import QUEUE_ARGUMENT_SPEC
from ansible_collections.cicc.cloud.plugins.module_utils.task_module import queue_errors
from ansible_collections.cicc.cloud.plugins.module_utils.task_module import queue_from_params
from ansible_collections.cicc.cloud.plugins.module_utils.task_module import s3_client


def compact(client, queue, status):
    """Fold the finished marks; returns (changed, what moved). Any mark or rejected line means a write: the
    mark is deleted once folded, the line moved out of the tasklist; so does a lock let go of."""
    moved = task_queue.compact(client, queue, force=True)
    counts = {state: moved[state] for state in ("completed", "failed", "rejected", "locks")}
    return bool(status["unfolded"] or status["rejected"] or any(counts.values())), counts


def xor_mismatches(client, module, queue, names):
    """The clinic's job's outputs recomputed (dataset.xor_mismatches), its job read from the queue's prefix."""

    def read(key):
        return task_queue.object_body(client, queue.bucket, key)

    found = read(queue.key(jobs.JOB_FILE))
    if found is None:
        module.fail_json(
            msg=f"check_xor needs the job file s3://{queue.bucket}/{queue.key(jobs.JOB_FILE)}: run the job step"
        )
    try:
        job = jobs.load(json.loads(found))
    except (ValueError, jobs.JobError) as error:
        module.fail_json(
            msg=f"s3://{queue.bucket}/{queue.key(jobs.JOB_FILE)} is not a job this collection reads: {error}"
        )
    return dataset.xor_mismatches(read, job, names)


def main():
    argument_spec = dict(
        QUEUE_ARGUMENT_SPEC,
        compact=dict(type="bool", default=False),
        check_outputs=dict(type="bool", default=False),
        check_xor=dict(type="bool", default=False),
    )

    module = AnsibleAWSModule(argument_spec=argument_spec, supports_check_mode=True)

    params = module.params
    queue = queue_from_params(params)
    client = s3_client(module)

    result = {"changed": False}
    with queue_errors(module, queue, "read the queue"):
        status = task_queue.queue_status(client, queue)
        if params["compact"] and module.check_mode:
            result["changed"] = bool(status["unfolded"] or status["rejected"])
        elif params["compact"]:
            result["changed"], result["compacted"] = compact(client, queue, status)
            if result["changed"]:
                status = task_queue.queue_status(client, queue)
        if params["check_outputs"] or params["check_xor"]:
            result["outputs"] = task_queue.check_outputs(client, queue, status["completed_tasks"])
        if params["check_xor"]:
            result["outputs"]["wrong"] += xor_mismatches(client, module, queue, status["completed_tasks"])
    module.exit_json(queue=status, **result)


if __name__ == "__main__":
    main()
