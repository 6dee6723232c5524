#!/usr/bin/python
# -*- coding: utf-8 -*-

# Copyright: cicc.cloud contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: task_claim
version_added: 0.1.0
short_description: Claim a task of the cicc.cloud S3 work queue
description:
  - Takes a lease on one task of the work queue kept under O(prefix) in O(bucket) by writing its lock
    C(locks/<name>) with C(If-None-Match), or with C(If-Match) on the ETag of a lock whose lease expired.
    At most one owner holds a task at a time.
  - With O(name) the module claims that task. Without it, it claims the first task of C(tasklist.txt), in the
    list's order, that is neither finished nor held by a live lease of another owner.
  - The claim protocol is the one the boot worker runs (C(plugins/module_utils/task_queue.py)); this module only
    adapts it. Hand the returned RV(task) to M(cicc.cloud.task_complete) or M(cicc.cloud.task_release).
  - A task whose output already exists, or that is recorded failed, is not claimed; the claim records it as
    finished (when that was not recorded yet) and returns RV(state). That is reported as a change - the lock
    was taken and let go - as is a claim itself. A claim refused because of a live lease changes nothing.
  - When a claim's reply was lost (the run was interrupted), pass the RV(task.token) of that claim, if known, as
    O(token) to find the claim again rather than fail against one's own lock.
  - O(lease_seconds) is the length of the lease taken. A lock older than its lease, by S3's clock, may be taken over.
  - Taking over an expired lease counts an attempt; a task whose O(max_attempts) attempts are used up is recorded
    failed instead of being claimed.
author:
  - cicc.cloud developers (!UNKNOWN)
options:
  name:
    description:
      - Name of the task to claim, as C(tasklist.txt) lists it (for example C(in3.dat)).
      - When omitted, the next pending task is claimed.
    type: str
  owner:
    description:
      - Who claims the task, recorded in the lock (for example the host name or a worker id).
    required: true
    type: str
  instance_id:
    description:
      - EC2 instance id recorded in the lock, shown by M(cicc.cloud.task_info).
    default: ""
    type: str
  token:
    description:
      - The RV(task.token) of an earlier claim by O(owner) whose reply was lost. The claim that lock records is
        found again and renewed instead of being refused as held. A new token is made when empty.
    default: ""
    type: str
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
      - In check mode the module reads the queue and reports the task it would claim, with an empty RV(task.etag).
  idempotent:
    support: none
    details:
      - Each run takes a lease. Without O(name) a second run claims the next task; with O(name) it is refused
        while the first lease is live, unless O(token) is the first claim's token.
notes:
  - Without O(name) the module reads C(tasklist.txt), the finished lists and every lock once, then
    tries the candidates in order; the boot worker uses a cheaper randomised picker instead.
seealso:
  - module: cicc.cloud.task_complete
  - module: cicc.cloud.task_release
  - module: cicc.cloud.task_info
"""

EXAMPLES = r"""
- name: Claim the next pending task
  cicc.cloud.task_claim:
    bucket: cicc-demo-bucket
    owner: "{{ inventory_hostname }}"
  register: claim

- name: Claim a given task, with a short lease
  cicc.cloud.task_claim:
    bucket: cicc-demo-bucket
    name: in3.dat
    owner: operator
    lease_seconds: 60
  register: claim

- name: Find a claim again after its reply was lost
  cicc.cloud.task_claim:
    bucket: cicc-demo-bucket
    owner: operator
    token: "{{ saved_claim_token }}"

- name: Complete the claimed task once its output is uploaded
  cicc.cloud.task_complete:
    bucket: cicc-demo-bucket
    name: "{{ claim.task.name }}"
    owner: "{{ claim.task.owner }}"
    token: "{{ claim.task.token }}"
    etag: "{{ claim.task.etag }}"
    attempts: "{{ claim.task.attempts }}"
  when: claim.claimed
"""

RETURN = r"""
claimed:
  description: Whether a task was claimed (would be claimed, in check mode).
  returned: always
  type: bool
  sample: true
task:
  description:
    - The lease held on the claimed task; empty when none was claimed.
    - Pass its fields to M(cicc.cloud.task_complete) or M(cicc.cloud.task_release).
  returned: always
  type: dict
  contains:
    name:
      description: Name of the task.
      type: str
      returned: when RV(claimed) is true
      sample: in3.dat
    owner:
      description: Owner of the lease.
      type: str
      returned: when RV(claimed) is true
      sample: operator
    token:
      description:
        - Identifies this claim; pass it as O(token) to find the claim again after a lost reply.
        - In check mode, O(token) as given.
      type: str
      returned: when RV(claimed) is true
      sample: 3f1c8e0b9d5a4a7c9f0e2b6d1a8c4e7f
    etag:
      description: ETag of the lock, the proof of ownership. Empty in check mode.
      type: str
      returned: when RV(claimed) is true
      sample: '"9b2cf535f27731c974343645a3985328"'
    attempts:
      description: Attempt number this claim is, counting lease takeovers and failed attempts.
      type: int
      returned: when RV(claimed) is true
      sample: 1
    instance_id:
      description: Instance id recorded in the lock.
      type: str
      returned: when RV(claimed) is true
      sample: i-0123456789abcdef0
    lease_seconds:
      description: Length of the lease in seconds.
      type: int
      returned: when RV(claimed) is true
      sample: 120
    last_error:
      description: Reason the previous attempt ended, when this claim took over a task tried before.
      type: str
      returned: when RV(claimed) is true
      sample: lease of worker-2 expired
reason:
  description: Why no task was claimed.
  returned: when RV(claimed) is false
  type: str
  sample: task in3.dat is held by worker-2 (lease 12 s old)
state:
  description: State of the task O(name) when it needs no work.
  returned: when O(name) is given and the task is finished
  type: str
  sample: completed
"""

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule

from ansible_collections.cicc.cloud.plugins.module_utils import task_queue
from ansible_collections.cicc.cloud.plugins.module_utils.task_module import QUEUE_ARGUMENT_SPEC
from ansible_collections.cicc.cloud.plugins.module_utils.task_module import queue_errors
from ansible_collections.cicc.cloud.plugins.module_utils.task_module import queue_from_params
from ansible_collections.cicc.cloud.plugins.module_utils.task_module import s3_client


def _candidates(status, owner, token):
    """Pending tasks worth a claim, in tasklist order: with ``token``, the owner's own claims first
    (one of them may be the lost one); then free tasks and expired leases. Live leases of others are
    left out: a claim on them is refused anyway."""
    claims = {held["task"]: held for held in status["claims"]}
    pending = status["pending_tasks"]
    own = [name for name in pending if token and name in claims and claims[name]["owner"] == owner]
    free = [name for name in pending if name not in own and (name not in claims or claims[name]["expired"])]
    busy = [name for name in pending if name not in own and name not in free]
    return own + free, busy, claims


def _predict(client, queue, name, held, params):
    """What a claim of ``name`` would do, by reading only: ("claim", task), ("held", reason) or ("finished", state)."""
    lease = task_queue.Lease(name, params["owner"], params["token"], "", 1, params["instance_id"], queue.lease_seconds)
    outcome, detail = task_queue.predict_claim(client, queue, name, lease, held)
    return outcome, (detail.as_dict() if outcome == "claim" else detail)


def _claim(client, queue, name, params):
    """The protocol's claim: ("claim", task), ("held", reason) or ("finished", state)."""
    try:
        lease = task_queue.claim(
            client, queue, name, params["owner"], params["instance_id"], take_over=True, token=params["token"]
        )
    except task_queue.ClaimConflict as e:
        return "held", str(e)
    except task_queue.TaskFinished as e:
        return "finished", e.state
    return "claim", lease.as_dict()


def claim_named(client, module, queue):
    name = module.params["name"]
    if module.check_mode:
        status = task_queue.queue_status(client, queue)
        held = {claim["task"]: claim for claim in status["claims"]}.get(name)
        outcome, detail = _predict(client, queue, name, held, module.params)
    else:
        outcome, detail = _claim(client, queue, name, module.params)
    if outcome == "claim":
        module.exit_json(changed=True, claimed=True, task=detail)
    if outcome == "held":
        module.exit_json(changed=False, claimed=False, task={}, reason=detail)
    # Finding it finished takes the lock and leaves it as the task's finished mark.
    module.exit_json(changed=True, claimed=False, task={}, state=detail, reason=f"task {name} is already {detail}")


def claim_next(client, module, queue):
    status = task_queue.queue_status(client, queue)
    candidates, busy, claims = _candidates(status, module.params["owner"], module.params["token"])
    wrote = False
    for name in candidates:
        if module.check_mode:
            outcome, detail = _predict(client, queue, name, claims.get(name), module.params)
        else:
            outcome, detail = _claim(client, queue, name, module.params)
        if outcome == "claim":
            module.exit_json(changed=True, claimed=True, task=detail)
        if outcome == "held":
            busy.append(name)
        else:
            wrote = True  # the claim marks a found output, or records a task out of attempts
    if busy:
        reason = f"every pending task is under a live lease: {', '.join(busy)}"
    else:
        reason = "no task is pending"
    module.exit_json(changed=wrote, claimed=False, task={}, reason=reason)


def main():
    argument_spec = dict(
        QUEUE_ARGUMENT_SPEC,
        name=dict(type="str"),
        owner=dict(type="str", required=True),
        instance_id=dict(type="str", default=""),
        token=dict(type="str", default="", no_log=False),
    )

    module = AnsibleAWSModule(argument_spec=argument_spec, supports_check_mode=True)

    params = module.params
    if params["lease_seconds"] < 1 or params["max_attempts"] < 1:
        module.fail_json(msg="lease_seconds and max_attempts must be at least 1")
    queue = queue_from_params(params)
    client = s3_client(module)

    with queue_errors(module, queue, "claim a task of the queue"):
        if params["name"] is not None:
            task_queue.check_name(params["name"])
            claim_named(client, module, queue)
        else:
            claim_next(client, module, queue)


if __name__ == "__main__":
    main()
