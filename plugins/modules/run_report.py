#!/usr/bin/python
# -*- coding: utf-8 -*-

# Copyright: cicc.cloud contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: run_report
version_added: 0.4.0
short_description: Write the report of a cicc.cloud run - trace, timeline, cost - from the workers' trace
description:
  - Reads the trace the workers wrote under O(prefix) in O(bucket) (a row for every attempt at every task, a record
    for every worker's run) and writes the run's report - C(trace.tsv) (one line per attempt), C(timeline.png) (a
    lane per worker slot, a bar per attempt coloured by how it ended, each machine's start and idle time) and
    C(report.html) (summary, failures with their reasons, stale outputs, cost, the timeline, every attempt, the
    settings) - to
    O(dest) and, with O(upload=true), under C(report/) in the queue's prefix.
  - The cost is each machine's time at its instance type's hourly price in its region and market plus the S3
    requests the workers sent at S3's price for them, by how S3 bills them. Prices come from a table shipped with
    the collection (dated, and the report says the date) with O(prices) laid over it.
  - A file is written only when its content changed, so running the module twice changes nothing.
author:
  - cicc.cloud developers (!UNKNOWN)
options:
  dest:
    description:
      - Local directory to write the report's files to (created if missing). Without it the report is only
        returned and, with O(upload=true), written to the bucket.
    type: path
  upload:
    description:
      - Also write the report's files under C(report/) in the queue's prefix.
    default: true
    type: bool
  since:
    description:
      - Report only the worker runs started at or after this time (seconds since the epoch) and their attempts. The
        default reports every run of the queue.
    default: 0
    type: float
  prices:
    description:
      - Prices laid over the shipped table - C(instances) (region, then instance type, then C(on-demand) or C(spot),
        USD an hour), C(s3_requests) (region, then C(write) and C(read), USD a request), and C(date) and C(source),
        which the report names.
    default: {}
    type: dict
  title:
    description:
      - Title of the HTML page. The default names the queue.
    type: str
  settings:
    description:
      - The run's settings, shown as they are on the HTML page (the job, the fleet's size and the like).
    default: {}
    type: dict
  outputs:
    description:
      - The outputs checked against their manifests (RV(cicc.cloud.task_info#module:outputs) of
        M(cicc.cloud.task_info) with O(cicc.cloud.task_info#module:check_outputs=true)), shown on the page - the
        stale ones with why, and how many have no provenance.
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
      - In check mode the report is computed and returned, and nothing is written; the result says whether a file
        would be.
requirements:
  - matplotlib (for the timeline picture)
seealso:
  - module: cicc.cloud.task_info
"""

EXAMPLES = r"""
- name: Write the run's report next to the playbook and to the bucket
  cicc.cloud.run_report:
    bucket: cicc-demo-bucket
    dest: "{{ playbook_dir }}/report"
  register: report

- name: Show what the run cost
  ansible.builtin.debug:
    msg: "USD {{ report.report.cost.usd | round(4) }} for {{ report.report.summary.tasks }} tasks"
"""

RETURN = r"""
report:
  description: What the report says.
  returned: always
  type: dict
  contains:
    summary:
      description: Tasks, attempts by outcome, machines, worker runs and slots, the wall time and the failures.
      type: dict
      returned: always
      sample: {"tasks": 10, "attempts": 10, "outcomes": {"done": 10}, "machines": 2, "worker_runs": 2, "slots": 2,
               "wall_seconds": 41.2, "failures": []}
    cost:
      description: USD in all, for the machines and for S3, by instance type and market, the requests, the bytes and
        the prices used.
      type: dict
      returned: always
      sample: {"usd": 0.0012, "machines_usd": 0.0011, "s3_usd": 0.0001, "prices_date": "2026-11-01"}
    workers:
      description: Each worker run - its worker, machine, start, stop, tasks completed and failed, and why it stopped.
      type: list
      elements: dict
      returned: always
files:
  description: The files written (or, in check mode, that would be), local paths and C(s3://) URLs.
  returned: always
  type: list
  elements: str
  sample: ["/home/me/report/trace.tsv", "s3://cicc-demo-bucket/report/trace.tsv"]
"""

import hashlib
import os

try:
    from botocore.exceptions import BotoCoreError
    from botocore.exceptions import ClientError
except ImportError:
    pass  # handled by AnsibleAWSModule

from ansible.module_utils.basic import missing_required_lib
from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule

from ansible_collections.cicc.cloud.plugins.module_utils import run_report
from ansible_collections.cicc.cloud.plugins.module_utils import run_trace
from ansible_collections.cicc.cloud.plugins.module_utils import task_queue
from ansible_collections.cicc.cloud.plugins.module_utils.task_module import QUEUE_LOCATION_SPEC
from ansible_collections.cicc.cloud.plugins.module_utils.task_module import s3_client

WORKER_FIELDS = ("worker", "instance_id", "instance_type", "market", "started_at", "stopped_at", "completed", "failed")
WORKER_FIELDS += ("stop_reason",)


def build(rows, workers, params, region):
    """The report's files by name, and what it says."""
    prices = run_report.merged_prices(params["prices"])
    cost = run_report.cost(rows, workers, prices, region)
    picture = run_report.timeline_png(rows, workers)
    title = params["title"] or f"cicc.cloud run report: s3://{params['bucket']}/{params['prefix']}"
    facts = run_report.summary(rows, workers)
    page = run_report.html_page(title, rows, facts, cost, picture, params["settings"], params["outputs"])
    files = {
        "trace.tsv": run_report.trace_tsv(rows).encode(),
        "timeline.png": picture,
        "report.html": page.encode(),
    }
    said = {
        "summary": facts,
        "cost": cost,
        "workers": [{field: record.get(field) for field in WORKER_FIELDS} for record in workers],
    }
    return files, said


def local_changes(dest, files):
    return {name for name, body in files.items() if not _same_file(os.path.join(dest, name), body)}


def _same_file(path, body):
    try:
        with open(path, "rb") as present:
            return present.read() == body
    except OSError:
        return False


def bucket_changes(client, bucket, prefix, files):
    return {
        name
        for name, body in files.items()
        if task_queue.object_etag(client, bucket, f"{prefix}report/{name}") != f'"{hashlib.md5(body).hexdigest()}"'
    }


CONTENT_TYPES = {"trace.tsv": "text/tab-separated-values", "timeline.png": "image/png", "report.html": "text/html"}


def main():
    argument_spec = dict(
        **QUEUE_LOCATION_SPEC,
        dest=dict(type="path"),
        upload=dict(type="bool", default=True),
        since=dict(type="float", default=0),
        prices=dict(type="dict", default={}),
        title=dict(type="str"),
        settings=dict(type="dict", default={}),
        outputs=dict(type="dict", default={}),
    )
    module = AnsibleAWSModule(argument_spec=argument_spec, supports_check_mode=True)
    params = module.params
    try:
        import matplotlib  # noqa: F401 - the timeline is drawn with it
    except ImportError as error:
        module.fail_json(msg=missing_required_lib("matplotlib"), exception=str(error))
    client = s3_client(module)
    bucket, prefix = params["bucket"], params["prefix"]
    where = f"s3://{bucket}/{prefix}"
    try:
        workers = [w for w in run_trace.read_workers(client, bucket, prefix) if w["started_at"] >= params["since"]]
        rows = [row for row in run_trace.read_trace(client, bucket, prefix) if row["claimed_at"] >= params["since"]]
        files, said = build(rows, workers, params, module.region or "us-east-1")
        written = []
        if params["dest"]:
            for name in sorted(local_changes(params["dest"], files)):
                written.append(os.path.join(params["dest"], name))
                if not module.check_mode:
                    os.makedirs(params["dest"], exist_ok=True)
                    with open(written[-1], "wb") as out:
                        out.write(files[name])
        if params["upload"]:
            for name in sorted(bucket_changes(client, bucket, prefix, files)):
                written.append(f"s3://{bucket}/{prefix}report/{name}")
                if not module.check_mode:
                    key = f"{prefix}report/{name}"
                    client.put_object(Bucket=bucket, Key=key, Body=files[name], ContentType=CONTENT_TYPES[name])
    except (BotoCoreError, ClientError) as error:
        module.fail_json_aws(error, msg=f"Couldn't read the trace or write the report in {where}")
    except OSError as error:
        module.fail_json(msg=f"Couldn't write the report to {params['dest']}: {error}")
    module.exit_json(changed=bool(written), files=written, report=said)


if __name__ == "__main__":
    main()
