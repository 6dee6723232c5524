# -*- coding: utf-8 -*-

# Copyright: cicc.cloud contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment:
    # The S3 work queue's rules, shared by the task modules (with LOCATION, where it lives)
    # (task_claim, task_complete, task_release, task_info; argument_spec in module_utils/task_module.py).
    DOCUMENTATION = r"""
options:
  lease_seconds:
    description:
      - Length of a lease in seconds.
    default: 120
    type: int
  max_attempts:
    description:
      - Number of attempts a task gets before it is recorded failed.
    default: 3
    type: int
"""

    # Where the queue and its trace are: every module of the queue takes it (run_plan and run_report only it).
    LOCATION = r"""
options:
  bucket:
    description:
      - Name of the S3 bucket that holds the queue and its trace.
    required: true
    type: str
  prefix:
    description:
      - Prefix of the queue's keys in O(bucket), as is (include the trailing C(/) for a folder).
    default: ""
    type: str
"""

    # The lease that task_claim returns (RV task), as task_complete and task_release take it back
    # (LEASE_ARGUMENT_SPEC in module_utils/task_module.py).
    LEASE = r"""
options:
  name:
    description:
      - Name of the claimed task (RV(cicc.cloud.task_claim#module:task.name)).
    required: true
    type: str
  owner:
    description:
      - Owner of the lease (RV(cicc.cloud.task_claim#module:task.owner)).
    required: true
    type: str
  token:
    description:
      - Token of the claim (RV(cicc.cloud.task_claim#module:task.token)).
    required: true
    type: str
  etag:
    description:
      - ETag of the lock (RV(cicc.cloud.task_claim#module:task.etag)). The lock is changed or deleted only while it
        still has this ETag, so a lease that was lost never touches another owner's lock.
    required: true
    type: str
  attempts:
    description:
      - Attempt number of the claim (RV(cicc.cloud.task_claim#module:task.attempts)).
    default: 1
    type: int
"""
