# -*- coding: utf-8 -*-
# Copyright: cicc.cloud contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The job_problems filter: a playbook's validate step lists every problem of a job before any change.

The rules live in module_utils/job.py, the one implementation the worker and the tests use too; the
documentation is in the sidecar job_problems.yml.
"""

from __future__ import annotations

from ansible_collections.cicc.cloud.plugins.module_utils.job import problems


def job_problems(data) -> list:
    """Every problem of the job ``data`` (the value of cicc_job), each a sentence; [] when it can run."""
    return problems(data)


class FilterModule:
    """cicc.cloud's filters."""

    def filters(self) -> dict:
        return {"job_problems": job_problems}
