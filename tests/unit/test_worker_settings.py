"""The boot worker's settings: the settings file, and the job and its limits from an instance's user data."""

from __future__ import annotations

import json
import logging
import types

import pytest

from ansible_collections.cicc.cloud.plugins.module_utils import run_trace


@pytest.fixture
def settings(worker_module):
    return worker_module.Settings()


def test_job_and_limits_from_user_data(settings) -> None:
    notes = settings.apply_user_data('{"job": "s3://work/xor/job.json", "max_tasks": 1, "slots": 2}')
    assert (settings.job, settings.max_tasks, settings.slots) == ("s3://work/xor/job.json", 1, 2)
    assert [text for _level, text in notes] == [
        "user data sets job to s3://work/xor/job.json",
        "user data sets max_tasks to 1",
        "user data sets slots to 2",
    ]


@pytest.mark.parametrize(
    ("user_data", "note"),
    [
        ('{"bucket": "elsewhere"}', "user data sets 'bucket', which it may not"),
        ('{"job": "work/job.json"}', "user data sets job to 'work/job.json', not an s3://BUCKET/KEY"),
        ('{"max_tasks": -1}', "user data sets max_tasks to -1, not a whole number of 0 or more: ignored"),
        ('{"max_tasks": "1"}', "user data sets max_tasks to '1', not a whole number"),
        ('{"max_tasks": true}', "user data sets max_tasks to True, not a whole number"),
        ("#!/bin/sh\necho hello", "user data is not a JSON object naming a job: ignored"),
        ("[1]", "user data is not a JSON object naming a job: ignored"),
    ],
)
def test_user_data_that_is_not_a_job_is_ignored_and_said(settings, user_data: str, note: str) -> None:
    notes = settings.apply_user_data(user_data)
    assert len(notes) == 1
    level, text = notes[0]
    assert level == logging.WARNING and text.startswith(note) and text.endswith("ignored")
    assert (settings.job, settings.max_tasks) == ("", 0)


def test_no_user_data_changes_nothing(settings) -> None:
    assert settings.apply_user_data("") == [] and settings.apply_user_data("\n") == []
    assert settings.max_tasks == 0


def test_identity_file_gives_instance_and_user_data(worker_module, settings, tmp_path) -> None:
    identity = tmp_path / "identity.json"
    facts = {"instance_type": "c4.large", "availability_zone": "us-east-1a", "market": "spot", "ami_id": "ami-1"}
    facts["launched_at"] = "1800000000.000"
    identity.write_text(json.dumps({"instance_id": "i-0123", "user_data": '{"max_tasks": 2}', **facts}))
    settings.identity_file = str(identity)
    assert worker_module.instance_metadata(settings) == {
        "instance_id": "i-0123",
        "user_data": '{"max_tasks": 2}',
        **facts,
    }
    identity.write_text(json.dumps({"instance_id": "i-0124"}))  # an identity file of an older local cloud
    assert worker_module.instance_metadata(settings) == {
        "instance_id": "i-0124",
        **dict.fromkeys([*facts, "user_data"], ""),
    }


def test_settings_file_rejects_unknown_keys(worker_module, tmp_path) -> None:
    path = tmp_path / "worker.json"
    path.write_text(json.dumps({"region": "eu-west-1", "max_task": 1, "bucket": "work"}))
    with pytest.raises(ValueError, match="unknown settings in .*: bucket, max_task"):
        worker_module.Settings.load(str(path), {})
    path.write_text(json.dumps({"region": "eu-west-1", "max_tasks": 1}))
    assert worker_module.Settings.load(str(path), {}).max_tasks == 1


@pytest.mark.parametrize(
    ("held", "lease"),
    [
        (None, 120),  # nothing held yet: the setting
        (1.0, 120),  # short tasks: never below the setting
        (60.0, 241),  # four times the claim-to-end time, so a task like it needs no renewal
        (3600.0, 900),  # at most 15 minutes: a worker that dies does not hold its next task longer
    ],
)
def test_a_slots_lease_grows_with_its_tasks(worker_module, settings, held, lease) -> None:
    attempt = run_trace.Attempt("in1.dat", 1, "w1", claimed_at=1000.0, ended_at=1000.0 + held if held else 0.0)
    worker = types.SimpleNamespace(settings=settings)
    assert worker_module.Worker._lease_after(worker, attempt) == lease
