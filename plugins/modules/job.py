#!/usr/bin/python
# -*- coding: utf-8 -*-

# Copyright: cicc.cloud contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: job
version_added: 0.2.0
short_description: Check a cicc.cloud job and put it in its bucket for the machines that run it
description:
  - A job is any container over any inputs in S3, described by a job file (its fields are documented in the
    collection's job file reference, C(docs/job.md)). This module checks O(job) against that one schema - the same
    code the boot worker checks it with - and fails naming every wrong field, the value given and what would be
    right, before anything is written.
  - With O(state=present) it writes the job, normalised, to C(<prefix>job.json) in the job's bucket (the key a fleet
    machine's user data names), and, for a job whose task names come from its inputs (C(tasks.source=inputs)), adds
    to the queue's C(tasklist.txt) the inputs that match C(tasks.pattern) and are neither listed nor finished.
  - A task whose output is stale (made from an input or shared file that changed since, or by another image than
    the job's) is reported by M(cicc.cloud.task_info) and made again only on request, O(recompute_stale=true).
  - With O(state=absent) it removes C(<prefix>job.json); the queue, the outputs and their manifests stay.
  - O(validate_only=true) checks the job and returns it normalised without reaching S3 at all.
author:
  - cicc.cloud developers (!UNKNOWN)
options:
  job:
    description:
      - The job, as the value of C(cicc_job) in a job file.
    type: dict
    required: true
  state:
    description:
      - V(present) writes the job and fills its queue; V(absent) removes the job file.
    type: str
    choices: [present, absent]
    default: present
  validate_only:
    description:
      - Only check the job and return it normalised; nothing is read or written.
    type: bool
    default: false
  recompute_stale:
    description:
      - Queue again the completed tasks whose outputs are stale, so that the next fleet makes them anew. Each one's
        manifest is kept under C(<prefix>superseded/<task>/) (how the old outputs were made), and only the outputs
        that manifest lists, as it lists them (same ETag), may then be replaced. Outputs without a manifest are never
        touched.
      - The image the job runs is the job's O(job) C(image.digest) when it gives one, else the newest manifest's.
    type: bool
    default: false
extends_documentation_fragment:
  - cicc.cloud.attributes
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
seealso:
  - module: cicc.cloud.task_info
"""

EXAMPLES = r"""
- name: Check the job before anything is made
  cicc.cloud.job:
    job: "{{ cicc_job }}"
    validate_only: true

- name: Put the job in its bucket and queue its inputs
  cicc.cloud.job:
    job: "{{ cicc_job }}"
  register: job

- name: Make again the outputs whose inputs changed since
  cicc.cloud.job:
    job: "{{ cicc_job }}"
    recompute_stale: true

- name: Say where the machines find it
  ansible.builtin.debug:
    msg: "user data: {{ {'job': job.location} | to_json }}"
"""

RETURN = r"""
job:
  description: The job, normalised (every field explicit), as the boot worker reads it.
  returned: always
  type: dict
  sample: {"name": "xor", "bucket": "cicc-demo-bucket", "prefix": ""}
location:
  description: Where the job file is, as a fleet machine's user data names it.
  returned: always
  type: str
  sample: s3://cicc-demo-bucket/job.json
ecr_repository_arn:
  description: The ECR repository the job's machines pull the image from (C(image.source=registry)), else empty.
  returned: always
  type: str
  sample: arn:aws:ecr:us-east-1:123456789012:repository/segment
tasks_added:
  description: Task names added to C(tasklist.txt) (in check mode, that would be).
  returned: always
  type: list
  elements: str
  sample: [in3.dat, in4.dat]
tasks_recomputed:
  description: The stale tasks queued again, with why (in check mode, that would be); empty unless O(recompute_stale=true).
  returned: always
  type: list
  elements: dict
  sample: [{"task": "in1.dat", "why": "input in1.dat changed since"}]
"""

import json

try:
    from botocore.exceptions import BotoCoreError
    from botocore.exceptions import ClientError
except ImportError:
    pass  # handled by AnsibleAWSModule

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule

from ansible_collections.cicc.cloud.plugins.module_utils import job as jobs
from ansible_collections.cicc.cloud.plugins.module_utils import task_queue
from ansible_collections.cicc.cloud.plugins.module_utils.task_module import s3_client


def _stored(client, job):
    """The job file in the bucket, parsed, or None when there is none (or it is not JSON)."""
    try:
        body = client.get_object(Bucket=job.bucket, Key=job.job_key)["Body"].read()
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    try:
        return json.loads(body)
    except ValueError:
        return None


def ecr_repository_arn(job):
    """The ARN of the ECR repository a registry image comes from, or "" (another registry, or no registry)."""
    host, dummy, path = job.image_name.partition("/")
    if job.image_source != "registry" or ".dkr.ecr." not in host or not path:
        return ""
    account, region = host.split(".", 1)[0], host.split(".dkr.ecr.", 1)[1].split(".", 1)[0]
    repository = path.split("@", 1)[0].rsplit(":", 1)[0]
    partition = "aws-cn" if region.startswith("cn-") else "aws-us-gov" if region.startswith("us-gov-") else "aws"
    return f"arn:{partition}:ecr:{region}:{account}:repository/{repository}"


def bucket_exists(client, bucket):
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("NoSuchBucket", "404", "NotFound"):
            return False
        raise
    return True


def put_job(client, module, job):
    """Write the job file unless it holds this very job; returns whether it changed."""
    wanted = job.as_dict()
    if _stored(client, job) == wanted:
        return False
    if not module.check_mode:
        body = json.dumps(wanted, indent=1, sort_keys=True).encode()
        client.put_object(Bucket=job.bucket, Key=job.job_key, Body=body, ContentType="application/json")
    return True


def remove_job(client, module, job):
    if _stored(client, job) is None:
        return False
    if not module.check_mode:
        client.delete_object(Bucket=job.bucket, Key=job.job_key)
    return True


def queue_inputs(client, module, job):
    """For a job whose tasks are its inputs: the matching inputs not yet queued nor finished, added."""
    if job.tasks_source != "inputs":
        return []
    queue = task_queue.Queue(job.bucket, job.prefix, max_attempts=job.attempts, input_prefix=job.input_prefix)
    names = task_queue.list_inputs(client, queue, job.tasks_pattern, exclude=job.shared)
    return task_queue.add_tasks(client, queue, names, check_mode=module.check_mode)


def recompute_stale(client, module, job):
    """The completed tasks whose outputs are stale (or were set aside by a recompute cut short), queued again."""
    queue = task_queue.Queue(job.bucket, job.prefix, max_attempts=job.attempts, input_prefix=job.input_prefix)
    completed = task_queue.queue_status(client, queue)["completed_tasks"]
    outputs = task_queue.check_outputs(client, queue, completed, image_id=job.image_digest)
    why = {entry["task"]: entry["why"] for entry in outputs["stale"]}
    why.update({name: "set aside by an earlier recompute" for name in outputs["without_manifest"]})
    queued = task_queue.recompute(client, queue, why, check_mode=module.check_mode)
    return [{"task": name, "why": why[name]} for name in queued]


def main():
    argument_spec = dict(
        job=dict(type="dict", required=True),
        state=dict(type="str", choices=["present", "absent"], default="present"),
        validate_only=dict(type="bool", default=False),
        recompute_stale=dict(type="bool", default=False),
    )
    module = AnsibleAWSModule(argument_spec=argument_spec, supports_check_mode=True)

    try:
        job = jobs.load(module.params["job"])
    except jobs.JobError as e:
        module.fail_json(msg=f"The job is refused; fix these fields: {e}", problems=e.problems)
    result = {
        "changed": False,
        "job": job.as_dict(),
        "location": f"s3://{job.bucket}/{job.job_key}",
        "ecr_repository_arn": ecr_repository_arn(job),
        "tasks_added": [],
        "tasks_recomputed": [],
    }
    if module.params["validate_only"]:
        module.exit_json(**result)

    client = s3_client(module)
    try:
        if module.check_mode and not bucket_exists(client, job.bucket):
            # Check mode of a whole pipeline on an empty account: the bucket step has not made it yet.
            result["changed"] = module.params["state"] == "present"
            module.exit_json(**result)
        if module.params["state"] == "absent":
            result["changed"] = remove_job(client, module, job)
        else:
            result["changed"] = put_job(client, module, job)
            if module.params["recompute_stale"]:
                result["tasks_recomputed"] = recompute_stale(client, module, job)
            result["tasks_added"] = queue_inputs(client, module, job)
            result["changed"] = result["changed"] or bool(result["tasks_added"] or result["tasks_recomputed"])
    except task_queue.QueueError as e:
        module.fail_json(msg=str(e))
    except (BotoCoreError, ClientError) as e:
        module.fail_json_aws(e, msg=f"Couldn't write job {job.name} to s3://{job.bucket}/{job.prefix}")
    module.exit_json(**result)


if __name__ == "__main__":
    main()
