"""The boot worker's settings: the settings file, and job parameters from an instance's user data."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def settings(worker_module):
    return worker_module.Settings(bucket="work")


def test_job_parameters_from_user_data(settings) -> None:
    notes = settings.apply_job('{"max_tasks": 1, "spectator_pause": 0}')
    assert (settings.max_tasks, settings.spectator_pause) == (1, 0)
    assert notes == ["user data sets max_tasks to 1", "user data sets spectator_pause to 0"]


@pytest.mark.parametrize(
    ("user_data", "note"),
    [
        ('{"bucket": "elsewhere"}', "user data sets 'bucket', which is not a job parameter"),
        ('{"max_tasks": -1}', "user data sets max_tasks to -1, not a whole number of 0 or more: ignored"),
        ('{"max_tasks": "1"}', "user data sets max_tasks to '1', not a whole number"),
        ('{"max_tasks": true}', "user data sets max_tasks to True, not a whole number"),
        ("#!/bin/sh\necho hello", "user data is not a JSON object of job parameters: ignored"),
        ("[1]", "user data is not a JSON object of job parameters: ignored"),
    ],
)
def test_user_data_that_is_not_a_job_is_ignored_and_said(settings, user_data: str, note: str) -> None:
    notes = settings.apply_job(user_data)
    assert len(notes) == 1 and notes[0].startswith(note) and notes[0].endswith("ignored")
    assert (settings.bucket, settings.max_tasks) == ("work", 0)


def test_no_user_data_changes_nothing(settings) -> None:
    assert settings.apply_job("") == [] and settings.apply_job("\n") == []
    assert settings.max_tasks == 0


def test_identity_file_gives_instance_and_user_data(worker_module, settings, tmp_path) -> None:
    identity = tmp_path / "identity.json"
    identity.write_text(json.dumps({"instance_id": "i-0123", "user_data": '{"max_tasks": 2}'}))
    settings.identity_file = str(identity)
    assert worker_module.instance_metadata(settings) == ("i-0123", '{"max_tasks": 2}')


def test_settings_file_rejects_unknown_keys(worker_module, tmp_path) -> None:
    path = tmp_path / "worker.json"
    path.write_text(json.dumps({"bucket": "work", "max_task": 1}))
    with pytest.raises(ValueError, match="unknown settings in .*: max_task"):
        worker_module.Settings.load(str(path), {})
    path.write_text(json.dumps({"bucket": "work", "max_tasks": 1}))
    assert worker_module.Settings.load(str(path), {}).max_tasks == 1
