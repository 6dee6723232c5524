"""build_dataset: the seed's data set, deterministic, with correct outputs and lists."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from ansible_collections.cicc.cloud.plugins.module_utils import dataset as ds
from ansible_collections.cicc.cloud.plugins.module_utils import task_queue as tq

ROOT = Path(__file__).resolve().parents[4]
# First bytes of in0.dat and the kernel for seed 121325 (inputs=2, input_size=64, kernel_size=8).
PINNED_IN0_HEAD = "6babb65af2a692f4"
PINNED_KERNEL = "c5832a9718ae6dea"


def _reference_xor(data: bytes, kernel: bytes) -> bytes:
    """The tiling rule written the plain way: out[i] = in[i] ^ kernel[i % len(kernel)]."""
    return bytes(byte ^ kernel[i % len(kernel)] for i, byte in enumerate(data))


def _small(**overrides) -> dict[str, bytes]:
    args = dict(inputs=4, input_size=2_500, kernel_size=300, done=2, seed=7)
    args.update(overrides)
    return ds.build_dataset(**args)


# --- shape --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "inputs, done, names",
    [
        (1, 0, ["in0.dat", "kernel.dat", "tasklist.txt", "completed.txt"]),
        (1, 1, ["in0.dat", "kernel.dat", "out0.dat", "tasklist.txt", "completed.txt"]),
        (
            3,
            2,
            ["in0.dat", "in1.dat", "in2.dat", "kernel.dat", "out0.dat", "out1.dat", "tasklist.txt", "completed.txt"],
        ),
    ],
)
def test_object_names_in_write_order(inputs: int, done: int, names: list[str]) -> None:
    objects = ds.build_dataset(inputs=inputs, input_size=10, kernel_size=3, done=done, seed=1)
    assert list(objects) == names
    assert ds.object_names(inputs, done) == names
    # The lists come last: a writer in this order never advertises a task before its input.
    assert names[-2:] == ["tasklist.txt", "completed.txt"]


def test_defaults_are_the_seeds_shape() -> None:
    objects = ds.build_dataset()
    assert len(objects) == 10 + 1 + 3 + 2
    assert all(len(objects[f"in{i}.dat"]) == 2_000_000 for i in range(10))
    assert len(objects["kernel.dat"]) == 1_000
    assert all(len(objects[f"out{i}.dat"]) == 2_000_000 for i in range(3))
    assert objects["tasklist.txt"] == b"".join(f"in{i}.dat\n".encode() for i in range(3, 10))
    assert objects["completed.txt"] == b"in0.dat\nin1.dat\nin2.dat\n"


@pytest.mark.parametrize("input_size, kernel_size", [(1, 1), (10, 3), (1_000, 1_000), (1_001, 1_000), (5, 50)])
def test_sizes(input_size: int, kernel_size: int) -> None:
    objects = ds.build_dataset(inputs=3, input_size=input_size, kernel_size=kernel_size, done=3, seed=3)
    assert {len(objects[f"in{i}.dat"]) for i in range(3)} == {input_size}
    assert {len(objects[f"out{i}.dat"]) for i in range(3)} == {input_size}
    assert len(objects["kernel.dat"]) == kernel_size


# --- determinism ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 121325, -5, 2**80])
def test_same_seed_same_bytes(seed: int) -> None:
    assert _small(seed=seed) == _small(seed=seed)


def test_same_bytes_in_another_process() -> None:
    """Seeding must not depend on the per-process hash salt (PYTHONHASHSEED)."""
    code = (
        "import hashlib, sys; sys.path.insert(0, sys.argv[1]);"
        "from ansible_collections.cicc.cloud.plugins.module_utils.dataset import build_dataset;"
        "d = build_dataset(inputs=2, input_size=1000, kernel_size=10, done=1, seed=42);"
        "print(hashlib.sha256(b''.join(d.values())).hexdigest())"
    )
    here = hashlib.sha256(
        b"".join(ds.build_dataset(inputs=2, input_size=1000, kernel_size=10, done=1, seed=42).values())
    ).hexdigest()
    for hash_seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code, str(ROOT / ".collections")],
            env={"PYTHONHASHSEED": hash_seed},
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.strip() == here


def test_pinned_bytes_of_the_seed() -> None:
    """The data set of a seed is a published fixture: changing its derivation must be deliberate."""
    objects = ds.build_dataset(inputs=2, input_size=64, kernel_size=8, done=1, seed=121325)
    assert objects["in0.dat"][:8].hex() == PINNED_IN0_HEAD
    assert objects["kernel.dat"].hex() == PINNED_KERNEL


@pytest.mark.parametrize("other", [dict(seed=8), dict(input_size=2_501), dict(kernel_size=301)])
def test_other_arguments_other_bytes(other: dict) -> None:
    base, changed = _small(), _small(**other)
    key = "kernel.dat" if "kernel_size" in other else "in0.dat"
    assert base[key] != changed[key]


def test_objects_differ_from_each_other() -> None:
    objects = _small(inputs=6, input_size=64, kernel_size=64)
    randoms = [objects[f"in{i}.dat"] for i in range(6)] + [objects["kernel.dat"]]
    assert len(set(randoms)) == len(randoms)


@pytest.mark.parametrize("other", [dict(inputs=9), dict(done=0), dict(done=4)])
def test_each_object_depends_only_on_seed_name_and_size(other: dict) -> None:
    """Growing the set or moving `done` leaves the inputs and kernel as they were."""
    base, changed = _small(), _small(**other)
    for name in ("in0.dat", "in1.dat", "in2.dat", "in3.dat", "kernel.dat"):
        assert base[name] == changed[name]


# --- outputs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "input_size, kernel_size",
    [(1, 1), (7, 3), (9, 3), (2_500, 300), (1_000, 1_000), (10, 50), (1, 7)],
)
def test_outputs_are_input_xor_tiled_kernel(input_size: int, kernel_size: int) -> None:
    objects = ds.build_dataset(inputs=2, input_size=input_size, kernel_size=kernel_size, done=2, seed=11)
    kernel = objects["kernel.dat"]
    for i in range(2):
        assert objects[f"out{i}.dat"] == _reference_xor(objects[f"in{i}.dat"], kernel)


@pytest.mark.parametrize(
    "data, kernel, expected",
    [
        (b"", b"\x01", b""),
        (b"\x00\x00\x00", b"\xff", b"\xff\xff\xff"),
        (b"\x00\x00\x00\x00\x00", b"\x01\x02", b"\x01\x02\x01\x02\x01"),
        (b"\x00\xff", b"\x0f\xf0\xaa", b"\x0f\x0f"),
        # Leading zero bytes in data and result must survive the int round trip.
        (b"\x00\x00\x01", b"\x00\x00\x01", b"\x00\x00\x00"),
    ],
)
def test_xor_tiled(data: bytes, kernel: bytes, expected: bytes) -> None:
    assert ds.xor_tiled(data, kernel) == expected


def test_xor_tiled_refuses_an_empty_kernel() -> None:
    with pytest.raises(ValueError, match="kernel is empty"):
        ds.xor_tiled(b"abc", b"")


def test_outputs_match_the_processing_step(tmp_path: Path) -> None:
    """The seed's outputs are what container/process.py would write for the same input and kernel."""
    pytest.importorskip("numpy")
    spec = importlib.util.spec_from_file_location("cicc_dataset_process", ROOT / "container" / "process.py")
    process = importlib.util.module_from_spec(spec)
    saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(process)
    finally:
        sys.dont_write_bytecode = saved
    objects = _small(input_size=2_345, kernel_size=1_000, done=1)
    for name in ("in0.dat", "kernel.dat"):
        (tmp_path / name).write_bytes(objects[name])
    process.run(str(tmp_path), "in0.dat", "kernel.dat", "out0.dat")
    assert (tmp_path / "out0.dat").read_bytes() == objects["out0.dat"]


# --- lists -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "inputs, done, tasklist, completed",
    [
        (1, 0, b"in0.dat\n", b""),
        (1, 1, b"", b"in0.dat\n"),
        (4, 2, b"in2.dat\nin3.dat\n", b"in0.dat\nin1.dat\n"),
        (12, 10, b"in10.dat\nin11.dat\n", b"".join(f"in{i}.dat\n".encode() for i in range(10))),
    ],
)
def test_lists(inputs: int, done: int, tasklist: bytes, completed: bytes) -> None:
    objects = ds.build_dataset(inputs=inputs, input_size=4, kernel_size=2, done=done, seed=5)
    assert objects["tasklist.txt"] == tasklist
    assert objects["completed.txt"] == completed
    pending, finished = ds.task_names(inputs, done)
    assert "".join(f"{name}\n" for name in pending).encode() == tasklist
    assert "".join(f"{name}\n" for name in finished).encode() == completed


def test_lists_are_what_the_queue_reads() -> None:
    """The claim protocol parses the seed's tasklist without rejects and names the same outputs."""
    objects = ds.build_dataset(inputs=10, input_size=4, kernel_size=2, done=3, seed=5)
    parsed = tq.parse_tasklist(objects["tasklist.txt"])
    assert parsed.names == [f"in{i}.dat" for i in range(3, 10)]
    assert parsed.rejected == [] and parsed.comments == []
    for name in tq.parse_tasklist(objects["completed.txt"]).names:
        assert ds.output_name(int(name[2:-4])) in objects


# --- argument validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(inputs=0), "inputs must be at least 1, got 0"),
        (dict(inputs=-1), "inputs must be at least 1"),
        (dict(input_size=0), "input_size must be at least 1, got 0"),
        (dict(kernel_size=0), "kernel_size must be at least 1, got 0"),
        (dict(done=-1), "done must be at least 0, got -1"),
        (dict(inputs=3, done=4), r"done must be between 0 and inputs \(3\), got 4"),
        (dict(inputs="10"), "inputs must be an integer, got '10'"),
        (dict(input_size=2.0), "input_size must be an integer, got 2.0"),
        (dict(kernel_size=True), "kernel_size must be an integer, got True"),
        (dict(seed="121325"), "seed must be an integer, got '121325'"),
        (dict(seed=None), "seed must be an integer, got None"),
    ],
)
def test_bad_arguments(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ds.build_dataset(**arguments)


@pytest.mark.parametrize("inputs, done", [(0, 0), (2, 3), (2, -1)])
def test_object_names_validate_too(inputs: int, done: int) -> None:
    with pytest.raises(ValueError):
        ds.object_names(inputs, done)
