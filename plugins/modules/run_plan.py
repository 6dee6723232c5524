#!/usr/bin/python
# -*- coding: utf-8 -*-

# Copyright: cicc.cloud contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: run_plan
version_added: 0.4.0
short_description: Plan a cicc.cloud run before launching it - machines, wall time, cost
description:
  - Reads the work queue under O(prefix) in O(bucket) and the trace of its earlier runs, and says what a run of a
    fleet of O(fleet_size) machines would do - the tasks pending and failed, the machines it would launch (never more
    than there is work for - with N tasks a machine at once, at most ceil(pending / N)), the expected wall time and
    cost, and with O(deadline_seconds) the fleet size that meets the deadline.
  - A task's time is the median of the earlier done attempts in the trace, else O(task_seconds). A machine's start is
    O(start_seconds) (launch to the worker's start) plus the worker's start to its first claim from the trace.
  - Read-only.
author:
  - cicc.cloud developers (!UNKNOWN)
options:
  fleet_size:
    description:
      - Machines the run may launch at most.
    required: true
    type: int
  instance_type:
    description:
      - Instance type of the machines.
    default: c4.large
    type: str
  spot:
    description:
      - Whether the machines are spot instances (priced as such).
    default: false
    type: bool
  cpus:
    description:
      - vCPUs a task of the job needs (the job's C(cpus)), for the tasks a machine runs at once.
    default: 1
    type: float
  memory_mib:
    description:
      - Memory a task of the job needs in MiB (the job's C(memory_mib)).
    default: 512
    type: int
  slots:
    description:
      - Tasks a machine runs at once; 0 takes them from the trace, else from the instance type's size.
    default: 0
    type: int
  max_tasks:
    description:
      - Tasks a machine takes before it stops (0, no limit).
    default: 0
    type: int
  task_seconds:
    description:
      - Seconds a task takes, used when the trace has no done attempt yet.
    default: 0
    type: float
  start_seconds:
    description:
      - Seconds from a machine's launch to its worker's start.
    default: 60
    type: float
  deadline_seconds:
    description:
      - A deadline from the launch, in seconds; the plan then says the fleet size that meets it.
    default: 0
    type: float
  prices:
    description:
      - Prices laid over the table the collection ships (as M(cicc.cloud.run_report) takes them).
    default: {}
    type: dict
extends_documentation_fragment:
  - cicc.cloud.attributes
  - cicc.cloud.task_queue.location
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
attributes:
  check_mode:
    support: full
    details:
      - The module only reads.
seealso:
  - module: cicc.cloud.run_report
  - module: cicc.cloud.task_info
"""

EXAMPLES = r"""
- name: Plan a run of up to 20 machines that must end within the hour
  cicc.cloud.run_plan:
    bucket: cicc-demo-bucket
    fleet_size: 20
    deadline_seconds: 3600
  register: plan
"""

RETURN = r"""
plan:
  description: What the run would do.
  returned: always
  type: dict
  contains:
    pending:
      description: Tasks pending (listed and not finished).
      type: int
      returned: always
      sample: 7
    failed:
      description: Tasks recorded failed (a run does not retry them).
      type: int
      returned: always
      sample: 0
    machines:
      description: Machines the run would launch.
      type: int
      returned: always
      sample: 3
    slots:
      description: Tasks a machine would run at once.
      type: int
      returned: always
      sample: 2
    task_seconds:
      description: Seconds a task is expected to take.
      type: float
      returned: always
      sample: 4.2
    task_seconds_from:
      description: Where that came from - C(trace), C(given) or empty when not known.
      type: str
      returned: always
      sample: trace
    start_seconds:
      description: Seconds from a machine's launch to its first claim.
      type: float
      returned: always
      sample: 61.5
    wall_seconds:
      description: Expected seconds from the launch until the queue is drained (null when a task's time is not known).
      type: float
      returned: always
      sample: 75.3
    usd:
      description: Expected cost in USD, machines and S3 requests (null when a task's time is not known).
      type: float
      returned: always
      sample: 0.0063
    deadline_machines:
      description: Machines that meet O(deadline_seconds) (null without one, or when none can).
      type: int
      returned: always
      sample: 4
"""

try:
    from botocore.exceptions import BotoCoreError
    from botocore.exceptions import ClientError
except ImportError:
    pass  # handled by AnsibleAWSModule

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule

from ansible_collections.cicc.cloud.plugins.module_utils import run_report
from ansible_collections.cicc.cloud.plugins.module_utils.task_module import QUEUE_LOCATION_SPEC
from ansible_collections.cicc.cloud.plugins.module_utils import run_trace
from ansible_collections.cicc.cloud.plugins.module_utils import task_queue
from ansible_collections.cicc.cloud.plugins.module_utils.task_module import s3_client


def main():
    argument_spec = dict(
        **QUEUE_LOCATION_SPEC,
        fleet_size=dict(type="int", required=True),
        instance_type=dict(type="str", default="c4.large"),
        spot=dict(type="bool", default=False),
        cpus=dict(type="float", default=1),
        memory_mib=dict(type="int", default=512),
        slots=dict(type="int", default=0),
        max_tasks=dict(type="int", default=0),
        task_seconds=dict(type="float", default=0),
        start_seconds=dict(type="float", default=60),
        deadline_seconds=dict(type="float", default=0),
        prices=dict(type="dict", default={}),
    )
    module = AnsibleAWSModule(argument_spec=argument_spec, supports_check_mode=True)
    params = module.params
    client = s3_client(module)
    bucket, prefix = params["bucket"], params["prefix"]
    machine = {key: params[key] for key in ("instance_type", "cpus", "memory_mib", "slots", "max_tasks")}
    machine.update(market="spot" if params["spot"] else "on-demand", region=module.region or "us-east-1")
    try:
        status = task_queue.queue_status(client, task_queue.Queue(bucket, prefix))
        rows = run_trace.read_trace(client, bucket, prefix)
        workers = run_trace.read_workers(client, bucket, prefix)
    except (BotoCoreError, ClientError) as error:
        module.fail_json_aws(error, msg=f"Couldn't read the queue or its trace in s3://{bucket}/{prefix}")
    planned = run_report.plan(
        status["pending"],
        rows,
        workers,
        run_report.merged_prices(params["prices"]),
        machine,
        params["fleet_size"],
        params["task_seconds"],
        params["start_seconds"],
        params["deadline_seconds"],
    )
    module.exit_json(changed=False, plan={**planned, "failed": status["failed"]})


if __name__ == "__main__":
    main()
