"""The container programs in their images, as the boot worker runs them with the real Docker Engine: the processing
image (container/process.py) and the summary image (container/summary/summarize.py), each built (or found up to date)
by scripts/process-image.sh. The programs themselves are tested without Docker in tests/unit/container."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from ansible_collections.cicc.cloud.plugins.module_utils import dataset
from ansible_collections.cicc.cloud.tests.unit.container import helpers
from ansible_collections.cicc.cloud.tests.unit.container.helpers import one_line

PROCESS_IMAGE = os.environ.get("CICC_PROCESS_IMAGE", "cicc-process:latest")
SUMMARY_IMAGE = os.environ.get("CICC_SUMMARY_IMAGE", "cicc-summary:latest")
process = helpers.load_program("cicc_container_process", helpers.ROOT / "container" / "process.py")
summarize = helpers.load_program("cicc_container_summarize", helpers.ROOT / "container" / "summary" / "summarize.py")


@pytest.fixture(scope="session")
def process_image(docker_client) -> str:
    return helpers.build_image(docker_client, PROCESS_IMAGE)


@pytest.fixture(scope="session")
def summary_image(docker_client) -> str:
    return helpers.build_image(docker_client, SUMMARY_IMAGE, "container/summary", SUMMARY_IMAGE)


def _random(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# --- the processing image -------------------------------------------------------------------------


def _process(docker_client, image: str, data_dir: Path, args: list[str]) -> tuple[int, str, str]:
    """The seed's way: the staged task's one directory at /data (the entrypoint's --data)."""
    return helpers.run_container(docker_client, image, args, {data_dir: ("/data", "rw")}, network_mode="host")


def test_process_image_processes_a_task(docker_client, process_image: str, tmp_path: Path) -> None:
    data, kernel = _random(2_000_000, seed=7), _random(1000, seed=8)
    (tmp_path / "in3.dat").write_bytes(data)
    (tmp_path / "kernel.dat").write_bytes(kernel)

    status, out, err = _process(
        docker_client, process_image, tmp_path, ["--input", "in3.dat", "--kernel", "kernel.dat", "--output", "out3.dat"]
    )

    assert status == 0, err
    assert one_line(out) == "SUCCESS in3.dat -> out3.dat 2000000 bytes"
    assert (tmp_path / "out3.dat").read_bytes() == dataset.xor_tiled(data, kernel)
    assert sorted(os.listdir(tmp_path)) == ["in3.dat", "kernel.dat", "out3.dat"]


def test_process_image_reports_a_missing_input(docker_client, process_image: str, tmp_path: Path) -> None:
    (tmp_path / "kernel.dat").write_bytes(_random(1000, seed=9))

    status, out, err = _process(
        docker_client, process_image, tmp_path, ["--input", "in3.dat", "--kernel", "kernel.dat", "--output", "out3.dat"]
    )

    assert status == process.EXIT_NO_INPUT and out == ""
    assert one_line(err) == "process.py: input /data/in3.dat does not exist: stage it in the data directory first"
    assert os.listdir(tmp_path) == ["kernel.dat"]


def test_process_image_runs_the_job_layout(docker_client, process_image: str, tmp_path: Path) -> None:
    """The XOR job's command in a job's mounts: --data on the command line replaces the entrypoint's /data."""
    input_dir, shared_dir, output_dir = helpers.make_dirs(tmp_path, "input", "shared", "output")
    data, kernel = _random(2_000_000, seed=12), _random(1000, seed=13)
    (input_dir / "in3.dat").write_bytes(data)
    (shared_dir / "kernel.dat").write_bytes(kernel)

    status, out, err = helpers.run_container(
        docker_client,
        process_image,
        ["--data", "/cicc/input", "--input", "in3.dat", "--kernel-dir", "/cicc/shared", "--kernel", "kernel.dat"]
        + ["--output-dir", "/cicc/output", "--output", "out3.dat"],
        {input_dir: ("/cicc/input", "ro"), shared_dir: ("/cicc/shared", "ro"), output_dir: ("/cicc/output", "rw")},
    )

    assert status == 0, err
    assert one_line(out) == "SUCCESS in3.dat -> out3.dat 2000000 bytes"
    assert os.listdir(output_dir) == ["out3.dat"]
    assert (output_dir / "out3.dat").read_bytes() == dataset.xor_tiled(data, kernel)
    assert os.listdir(input_dir) == ["in3.dat"] and os.listdir(shared_dir) == ["kernel.dat"]


# --- the summary image ----------------------------------------------------------------------------


def _summarize(docker_client, image: str, input_dir: Path, output_dir: Path) -> tuple[int, str, str]:
    """A job's mounts: the input read-only at /cicc/input, the outputs at /cicc/output, no network."""
    mounts = {input_dir: ("/cicc/input", "ro"), output_dir: ("/cicc/output", "rw")}
    args = ["--input", "/cicc/input/in3.dat", "--output-dir", "/cicc/output"]
    return helpers.run_container(docker_client, image, args, mounts)


def test_summary_image_summarizes_a_task(docker_client, summary_image: str, tmp_path: Path) -> None:
    input_dir, output_dir = helpers.make_dirs(tmp_path, "input", "output")
    data = _random(2_000_000, seed=13)
    (input_dir / "in3.dat").write_bytes(data)

    status, out, err = _summarize(docker_client, summary_image, input_dir, output_dir)

    assert status == 0, err
    assert one_line(out) == "SUCCESS in3.dat -> summary.json histogram.npy 2000000 bytes"
    summary = json.loads((output_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["size"] == len(data) and summary["sha256"] == hashlib.sha256(data).hexdigest()
    histogram = np.load(output_dir / "histogram.npy", allow_pickle=False)
    assert histogram.tolist() == np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256).tolist()
    assert sorted(os.listdir(output_dir)) == ["histogram.npy", "summary.json"]


def test_summary_image_reports_a_missing_input(docker_client, summary_image: str, tmp_path: Path) -> None:
    input_dir, output_dir = helpers.make_dirs(tmp_path, "input", "output")

    status, out, err = _summarize(docker_client, summary_image, input_dir, output_dir)

    assert status == summarize.EXIT_NO_INPUT and out == ""
    assert one_line(err) == "summarize.py: input /cicc/input/in3.dat does not exist: stage it first"
    assert os.listdir(output_dir) == []


@pytest.mark.parametrize("image", [PROCESS_IMAGE, SUMMARY_IMAGE])
def test_images_say_what_they_were_built_from(docker_client, process_image, summary_image, image: str) -> None:
    labels = docker_client.images.get(image).labels
    assert labels["org.opencontainers.image.title"] == image.split(":")[0]
    assert len(labels["cicc.source-hash"]) == 64
    assert labels["cicc.base-id"] == docker_client.images.get(helpers.BASE_IMAGE).id
