# -*- coding: utf-8 -*-
# Copyright: cicc.cloud contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The modules' side of the task queue: what task_claim, task_complete, task_release and task_info share (and
run_plan and run_report, which only read the queue: where it is).

Their common options (documented by the cicc.cloud.task_queue doc fragment), the task_queue.Queue and
task_queue.Lease built from their parameters, and the failed result an error of the protocol gives.
The protocol itself stays in task_queue, which the boot worker runs too and which never imports Ansible.
"""

from __future__ import annotations

from contextlib import contextmanager

try:
    from botocore.exceptions import BotoCoreError
    from botocore.exceptions import ClientError
except ImportError:
    pass  # handled by AnsibleAWSModule

from ansible_collections.cicc.cloud.plugins.module_utils import task_queue

# Where the queue is (the cicc.cloud.task_queue.location doc fragment): what run_plan and run_report take.
QUEUE_LOCATION_SPEC = dict(
    bucket=dict(type="str", required=True),
    prefix=dict(type="str", default=""),
)
QUEUE_ARGUMENT_SPEC = dict(
    **QUEUE_LOCATION_SPEC,
    lease_seconds=dict(type="int", default=120),
    max_attempts=dict(type="int", default=3),
)

# The lease task_claim returns (RV task), as task_complete and task_release take it back.
LEASE_ARGUMENT_SPEC = dict(
    name=dict(type="str", required=True),
    owner=dict(type="str", required=True),
    token=dict(type="str", required=True, no_log=False),
    etag=dict(type="str", required=True),
    attempts=dict(type="int", default=1),
)


def s3_client(module):
    """The module's S3 client, with the protocol's retries (task_queue.S3_RETRIES, as the worker's)."""
    return module.client("s3", config=task_queue.s3_config())


def queue_from_params(params: dict) -> task_queue.Queue:
    return task_queue.Queue(params["bucket"], params["prefix"], params["lease_seconds"], params["max_attempts"])


def lease_from_params(params: dict) -> task_queue.Lease:
    """The lease named by the LEASE_ARGUMENT_SPEC options, with the queue's lease length."""
    fields = {key: params[key] for key in LEASE_ARGUMENT_SPEC}
    return task_queue.Lease(lease_seconds=params["lease_seconds"], **fields)


@contextmanager
def queue_errors(module, queue: task_queue.Queue, action: str):
    """Fail the module on an error in the block: a QueueError with its own message (it names the task and what is
    wrong), an S3 error through fail_json_aws with "Couldn't <action> in s3://<bucket>/<prefix>"."""
    try:
        yield
    except task_queue.QueueError as e:
        module.fail_json(msg=str(e))
    except (BotoCoreError, ClientError) as e:
        module.fail_json_aws(e, msg=f"Couldn't {action} in s3://{queue.bucket}/{queue.prefix}")
