"""Check every output of a drained queue against input XOR kernel, recomputed here with numpy.

Usage: verify-outputs.py BUCKET [PREFIX]   (endpoint and credentials from the usual AWS_* variables)
Exit 0 when every completed task's output is right, 1 otherwise, naming each wrong or missing one.
"""

from __future__ import annotations

import sys

import boto3
import numpy as np

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0] + "/.collections")
from ansible_collections.cicc.cloud.plugins.module_utils import task_queue  # noqa: E402


def main(bucket: str, prefix: str = "") -> int:
    s3 = boto3.client("s3")
    queue = task_queue.Queue(bucket, prefix)

    def read(key: str) -> np.ndarray:
        return np.frombuffer(s3.get_object(Bucket=bucket, Key=prefix + key)["Body"].read(), dtype=np.uint8)

    kernel = read(queue.kernel)
    completed = task_queue.parse_tasklist(s3.get_object(Bucket=bucket, Key=prefix + "completed.txt")["Body"].read())
    wrong = []
    for name in completed.names:
        data = read(name)
        try:
            output = read(task_queue.output_name(name))
        except s3.exceptions.NoSuchKey:
            wrong.append(f"{name}: output {task_queue.output_name(name)} missing")
            continue
        if not np.array_equal(output, data ^ np.resize(kernel, data.size)):
            wrong.append(f"{name}: output {task_queue.output_name(name)} differs from input XOR kernel")
    for line in wrong:
        print(f"WRONG {line}")
    print(f"verified {len(completed.names) - len(wrong)}/{len(completed.names)} outputs in s3://{bucket}/{prefix}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
