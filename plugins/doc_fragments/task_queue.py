# -*- coding: utf-8 -*-

# Copyright: cicc.cloud contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment:
    # Where the S3 work queue lives and its rules, shared by the task modules
    # (task_claim, task_complete, task_release, task_info; argument_spec in module_utils/task_module.py).
    DOCUMENTATION = r"""
options:
  bucket:
    description:
      - Name of the S3 bucket that holds the queue.
    required: true
    type: str
  prefix:
    description:
      - Prefix of the queue's keys in O(bucket), as is (include the trailing C(/) for a folder).
    default: ""
    type: str
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
