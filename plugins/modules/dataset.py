#!/usr/bin/python
# -*- coding: utf-8 -*-

# Copyright: cicc.cloud contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
---
module: dataset
version_added: 0.1.0
short_description: Put the seed's data set of the cicc.cloud pipeline in an S3 bucket, or remove it
description:
  - Builds the data set of the pipeline deterministically from O(seed) and writes it under O(prefix) in
    O(bucket) - inputs C(in0.dat) ... C(in<inputs-1>.dat) of random bytes, C(kernel.dat), the outputs already
    done C(out0.dat) ... C(out<done-1>.dat) (input XOR kernel, the kernel tiled along the input and its last
    repetition truncated), C(tasklist.txt) listing the inputs still to do and C(completed.txt) listing those done.
  - The same arguments always give the same bytes. An object is left alone when the bucket already holds it with
    the same size and MD5 ETag (its body is compared when the ETag is not a plain MD5, as with multipart uploads
    or SSE-KMS), so a second run reports no change.
  - An object of the data set that exists with other content is never overwritten unless O(overwrite=true); the
    module fails naming those keys before it writes anything.
  - C(tasklist.txt) and C(completed.txt) are the queue's state once they exist - workers move tasks from one to
    the other - so lists that exist are left as they are (and returned as RV(dataset.queue_lists)) unless
    O(overwrite=true). A re-run after workers have started therefore changes nothing and fails on nothing. Missing objects are created with
    C(If-None-Match) and replaced ones with C(If-Match) on the ETag seen, so a concurrent writer is never
    overwritten blindly either.
  - The two lists are written last, so no task is advertised before its input exists.
  - The bucket must exist; create it with M(amazon.aws.s3_bucket). In check mode a missing bucket is taken as one
    an earlier task would create, so every object would be written. With O(state=absent) a missing bucket holds
    nothing to delete.
author:
  - cicc.cloud developers (!UNKNOWN)
options:
  bucket:
    description:
      - Name of the existing S3 bucket that holds the data set.
    required: true
    type: str
  prefix:
    description:
      - Prefix put in front of every object name, as is (include the trailing C(/) for a folder).
    default: ""
    type: str
  inputs:
    description:
      - Number of input objects. At least V(1).
    default: 10
    type: int
  input_size:
    description:
      - Size of each input object in bytes. At least V(1).
    default: 2000000
    type: int
  kernel_size:
    description:
      - Size of C(kernel.dat) in bytes. At least V(1).
    default: 1000
    type: int
  done:
    description:
      - Number of inputs already processed - their outputs exist and C(completed.txt) lists them.
      - Between V(0) and O(inputs).
    default: 3
    type: int
  seed:
    description:
      - Seed the random bytes derive from. Each object depends only on the seed, its name and its size.
    default: 121325
    type: int
  state:
    description:
      - V(present) writes the data set; V(absent) deletes the data set's keys, whatever their content (the lists
        change as the pipeline runs). Other keys under O(prefix), such as outputs the pipeline produced, are left.
      - With V(absent) the keys are those of the data set that O(inputs) and O(done) describe, so give the values
        it was written with.
    default: present
    choices: [present, absent]
    type: str
  overwrite:
    description:
      - Replace objects of the data set that exist with other content. When V(false) the module fails instead,
        naming those keys.
      - V(true) also rewrites the two lists as the data set has them, which puts every task back in the queue;
        outputs and locks of the pipeline are not removed.
    default: false
    type: bool
extends_documentation_fragment:
  - cicc.cloud.attributes
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
notes:
  - The whole data set is built in memory (about O(inputs) x O(input_size) bytes plus the outputs).
"""

EXAMPLES = r"""
- name: Put the seed's data set in the work bucket
  cicc.cloud.dataset:
    bucket: cicc-demo-bucket

- name: A small data set under a prefix, on the local emulator
  cicc.cloud.dataset:
    bucket: cicc-demo-bucket
    prefix: small/
    inputs: 4
    input_size: 20000
    done: 1
    endpoint_url: http://127.0.0.1:5000

- name: Replace a data set that was changed by hand
  cicc.cloud.dataset:
    bucket: cicc-demo-bucket
    overwrite: true

- name: Remove the data set
  cicc.cloud.dataset:
    bucket: cicc-demo-bucket
    state: absent
"""

RETURN = r"""
dataset:
  description: The data set in the bucket.
  returned: always
  type: dict
  contains:
    bucket:
      description: Name of the bucket.
      type: str
      returned: always
      sample: cicc-demo-bucket
    prefix:
      description: Prefix in front of every object name.
      type: str
      returned: always
      sample: ""
    objects:
      description: Keys of the data set's objects.
      type: list
      elements: str
      returned: always
      sample: ["in0.dat", "in1.dat", "kernel.dat", "out0.dat", "tasklist.txt", "completed.txt"]
    written:
      description: Keys written by this run (that would be written, in check mode).
      type: list
      elements: str
      returned: when O(state=present)
      sample: ["in1.dat", "tasklist.txt"]
    queue_lists:
      description:
        - Keys of the two lists that already existed and were left as they are, being the queue's state.
      type: list
      elements: str
      returned: when O(state=present)
      sample: ["tasklist.txt", "completed.txt"]
    deleted:
      description: Keys deleted by this run (that would be deleted, in check mode).
      type: list
      elements: str
      returned: when O(state=absent)
      sample: ["in0.dat", "kernel.dat"]
    tasks:
      description: Input names C(tasklist.txt) lists, still to do.
      type: list
      elements: str
      returned: always
      sample: ["in1.dat"]
    completed:
      description: Input names C(completed.txt) lists, already done.
      type: list
      elements: str
      returned: always
      sample: ["in0.dat"]
"""

import base64
import hashlib

try:
    from botocore.exceptions import BotoCoreError
    from botocore.exceptions import ClientError
except ImportError:
    pass  # handled by AnsibleAWSModule

from ansible_collections.amazon.aws.plugins.module_utils.botocore import is_boto3_error_code
from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule

from ansible_collections.cicc.cloud.plugins.module_utils.dataset import COMPLETED
from ansible_collections.cicc.cloud.plugins.module_utils.dataset import TASKLIST
from ansible_collections.cicc.cloud.plugins.module_utils.dataset import build_dataset
from ansible_collections.cicc.cloud.plugins.module_utils.dataset import check_arguments
from ansible_collections.cicc.cloud.plugins.module_utils.dataset import object_names
from ansible_collections.cicc.cloud.plugins.module_utils.dataset import task_names
from ansible_collections.cicc.cloud.plugins.module_utils.task_module import s3_client

_MISSING = ["404", "NoSuchKey", "NotFound"]
_PRECONDITION = ["412", "PreconditionFailed"]
_SHAPE = ("inputs", "input_size", "kernel_size", "done", "seed")


def _md5(body):
    return hashlib.md5(body, usedforsecurity=False)


def _head(client, bucket, key):
    """The object's size and ETag, or None when it does not exist."""
    try:
        response = client.head_object(Bucket=bucket, Key=key)
    except is_boto3_error_code(_MISSING):
        return None
    return {"size": response["ContentLength"], "etag": response["ETag"]}


def _holds(client, bucket, key, found, body):
    """Whether the existing object ``found`` has exactly ``body``."""
    if found["size"] != len(body):
        return False
    etag = found["etag"].strip('"')
    if "-" not in etag and etag == _md5(body).hexdigest():
        return True
    # Same size but an ETag that is not this MD5: a multipart upload or SSE-KMS gives an ETag that is
    # no MD5 at all, so only the body can tell.
    existing = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return existing == body


def _put(client, bucket, key, body, found):
    """Write one object without ever replacing a version this run did not see."""
    condition = {"IfMatch": found["etag"]} if found else {"IfNoneMatch": "*"}
    checksum = base64.b64encode(_md5(body).digest()).decode("ascii")
    client.put_object(Bucket=bucket, Key=key, Body=body, ContentMD5=checksum, **condition)


def _summary(params, names):
    pending, completed = task_names(params["inputs"], params["done"])
    return {
        "bucket": params["bucket"],
        "prefix": params["prefix"],
        "objects": [params["prefix"] + name for name in names],
        "tasks": pending,
        "completed": completed,
    }


def bucket_exists(client, module):
    bucket = module.params["bucket"]
    try:
        client.head_bucket(Bucket=bucket)
    except is_boto3_error_code(_MISSING):
        return False
    except (BotoCoreError, ClientError) as e:  # pylint: disable=duplicate-except
        module.fail_json_aws(e, msg=f"Couldn't access bucket {bucket}")
    return True


def ensure_present(client, module, bucket_found):
    params = module.params
    bucket, prefix = params["bucket"], params["prefix"]
    if not bucket_found and not module.check_mode:
        module.fail_json(msg=f"Couldn't find bucket {bucket}: create it first (amazon.aws.s3_bucket)")
    wanted = build_dataset(**{name: params[name] for name in _SHAPE})

    to_write, conflicts, queue_lists = [], [], []
    for name, body in wanted.items():
        key = prefix + name
        try:
            # In check mode the bucket may only be going to be created by an earlier task.
            found = _head(client, bucket, key) if bucket_found else None
            if found is None:
                to_write.append((key, body, None))
            elif name in (TASKLIST, COMPLETED) and not params["overwrite"]:
                queue_lists.append(key)
            elif not _holds(client, bucket, key, found, body):
                conflicts.append(key)
                to_write.append((key, body, found))
        except (BotoCoreError, ClientError) as e:
            module.fail_json_aws(e, msg=f"Couldn't read s3://{bucket}/{key}")

    result = dict(_summary(params, list(wanted)), queue_lists=queue_lists)
    if conflicts and not params["overwrite"]:
        module.fail_json(
            msg=(
                f"Objects of the data set already exist in bucket {bucket} with other content: {', '.join(conflicts)}. "
                "They were not overwritten; set overwrite=true to replace them, or use another prefix."
            ),
            conflicts=conflicts,
            dataset=dict(result, written=[]),
        )

    result["written"] = [key for key, _body, _found in to_write]
    if not module.check_mode:
        for key, body, found in to_write:
            try:
                _put(client, bucket, key, body, found)
            except is_boto3_error_code(_PRECONDITION) as e:
                module.fail_json_aws(
                    e,
                    msg=(
                        f"Couldn't write s3://{bucket}/{key}: another writer changed it while the data set was being "
                        "written, and it was not overwritten; run again to see what it holds"
                    ),
                )
            except (BotoCoreError, ClientError) as e:  # pylint: disable=duplicate-except
                module.fail_json_aws(e, msg=f"Couldn't write s3://{bucket}/{key}")
    module.exit_json(changed=bool(to_write), dataset=result)


def ensure_absent(client, module, bucket_found):
    params = module.params
    bucket, prefix = params["bucket"], params["prefix"]
    names = object_names(params["inputs"], params["done"])

    to_delete = []
    for name in names:
        key = prefix + name
        try:
            # No bucket, no data set: nothing to delete.
            if bucket_found and _head(client, bucket, key) is not None:
                to_delete.append(key)
        except (BotoCoreError, ClientError) as e:
            module.fail_json_aws(e, msg=f"Couldn't read s3://{bucket}/{key}")

    if not module.check_mode:
        for key in to_delete:
            try:
                client.delete_object(Bucket=bucket, Key=key)
            except (BotoCoreError, ClientError) as e:
                module.fail_json_aws(e, msg=f"Couldn't delete s3://{bucket}/{key}")
    module.exit_json(changed=bool(to_delete), dataset=dict(_summary(params, names), deleted=to_delete))


def main():
    argument_spec = dict(
        bucket=dict(type="str", required=True),
        prefix=dict(type="str", default=""),
        inputs=dict(type="int", default=10),
        input_size=dict(type="int", default=2000000),
        kernel_size=dict(type="int", default=1000),
        done=dict(type="int", default=3),
        seed=dict(type="int", default=121325),
        state=dict(type="str", default="present", choices=["present", "absent"]),
        overwrite=dict(type="bool", default=False),
    )

    module = AnsibleAWSModule(argument_spec=argument_spec, supports_check_mode=True)

    params = module.params
    try:
        check_arguments(**{name: params[name] for name in _SHAPE})
    except ValueError as e:
        module.fail_json(msg=str(e))

    client = s3_client(module)
    bucket_found = bucket_exists(client, module)

    if params["state"] == "present":
        ensure_present(client, module, bucket_found)
    else:
        ensure_absent(client, module, bucket_found)


if __name__ == "__main__":
    main()
