"""Check every output of the clinic's XOR job against input XOR kernel, recomputed here with numpy.

Usage: verify-outputs.py BUCKET [PREFIX]   (endpoint and credentials from the usual AWS_* variables)
The job is read from PREFIX/job.json (the job step writes it): its first shared file is the kernel, and its
output naming says where each output is. Exit 0 when every completed task's output is right, 1 otherwise,
naming each wrong or missing one.
"""

from __future__ import annotations

import json
import sys

import boto3
import numpy as np

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0] + "/.collections")
from ansible_collections.cicc.cloud.plugins.module_utils import job as jobs  # noqa: E402
from ansible_collections.cicc.cloud.plugins.module_utils import task_queue  # noqa: E402


def main(bucket: str, prefix: str = "") -> int:
    s3 = boto3.client("s3")

    def read(key: str) -> np.ndarray:
        return np.frombuffer(s3.get_object(Bucket=bucket, Key=key)["Body"].read(), dtype=np.uint8)

    job = jobs.load(json.loads(s3.get_object(Bucket=bucket, Key=prefix + jobs.JOB_FILE)["Body"].read()))
    kernel = read(job.shared_key(job.shared[0]))
    completed = task_queue.parse_tasklist(s3.get_object(Bucket=bucket, Key=prefix + "completed.txt")["Body"].read())
    wrong = []
    for name in completed.names:
        data = read(job.input_key(name))
        output = job.output_key(name, job.output_name(name))
        try:
            produced = read(output)
        except s3.exceptions.NoSuchKey:
            wrong.append(f"{name}: output {output} missing")
            continue
        if not np.array_equal(produced, data ^ np.resize(kernel, data.size)):
            wrong.append(f"{name}: output {output} differs from input XOR kernel")
    for line in wrong:
        print(f"WRONG {line}")
    print(f"verified {len(completed.names) - len(wrong)}/{len(completed.names)} outputs in s3://{bucket}/{prefix}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
