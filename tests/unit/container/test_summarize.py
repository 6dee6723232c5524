"""Tests of container/summary/summarize.py: every field against an independent recomputation, the exit codes,
atomic output, SIGTERM, flat memory and the real image."""

from __future__ import annotations

import collections
import errno
import hashlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ansible_collections.cicc.cloud.tests.unit.container import helpers
from ansible_collections.cicc.cloud.tests.unit.container.helpers import one_line

SCRIPT = helpers.ROOT / "container" / "summary" / "summarize.py"
IMAGE = os.environ.get("CICC_SUMMARY_IMAGE", "cicc-summary:latest")
MIB = 1024 * 1024
OUTPUTS = ["histogram.npy", "summary.json"]

summarize = helpers.load_program("cicc_container_summarize", SCRIPT)


def _expected(name: str, data: bytes) -> dict[str, object]:
    """The summary recomputed from the whole bytes without numpy or the program's code."""
    counts = collections.Counter(data)
    return {
        "input": name,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "mean": statistics.fmean(data) if data else 0.0,
        "min": min(data) if data else None,
        "max": max(data) if data else None,
        "zero_bytes": data.count(0),
        "distinct_bytes": len(counts),
    }


def _random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _skewed_bytes(size: int, seed: int) -> bytes:
    """Mostly zeros and a few values only: distinct_bytes < 256, min > 0 is impossible, max < 255."""
    rng = random.Random(seed)
    return bytes(rng.choice((0, 0, 0, 7, 42, 200)) for dummy in range(size))


INPUTS = [
    pytest.param(b"", id="empty"),
    pytest.param(b"\x00", id="one-zero-byte"),
    pytest.param(b"\xff", id="one-ff-byte"),
    pytest.param(b"\x05" * 1000, id="one-value"),
    pytest.param(bytes(range(256)), id="every-value-once"),
    pytest.param(_random_bytes(1000, seed=1), id="random-1000"),
    pytest.param(_skewed_bytes(50_000, seed=2), id="skewed-50000"),
    pytest.param(_random_bytes(MIB - 1, seed=3), id="chunk-minus-one"),
    pytest.param(_random_bytes(MIB, seed=4), id="one-chunk"),
    pytest.param(_random_bytes(MIB + 1, seed=5), id="chunk-plus-one"),
    pytest.param(_random_bytes(3 * MIB + 12_345, seed=6), id="several-chunks"),
    pytest.param(bytes(2 * MIB + 3), id="zeros-over-two-chunks"),
]


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    input_dir, output_dir = helpers.make_dirs(tmp_path, "input", "output")
    return input_dir, output_dir


def _stage(dirs: tuple[Path, Path], data: bytes, name: str = "in3.dat") -> Path:
    path = dirs[0] / name
    path.write_bytes(data)
    return path


def _run(path: Path | str, output_dir: Path | str) -> int:
    return summarize.main(["--input", str(path), "--output-dir", str(output_dir)])


def _check_outputs(output_dir: Path, name: str, data: bytes) -> None:
    expected = _expected(name, data)
    text = (output_dir / "summary.json").read_text(encoding="utf-8")
    summary = json.loads(text)
    assert summary == expected
    assert text == json.dumps(expected, sort_keys=True, indent=1) + "\n", "sorted keys, indent 1, final newline"
    assert isinstance(summary["mean"], float) and isinstance(summary["size"], int)
    assert not isinstance(summary["size"], bool)

    histogram = np.load(output_dir / "histogram.npy", allow_pickle=False)
    assert histogram.dtype == np.uint64 and histogram.shape == (256,)
    counts = collections.Counter(data)
    assert histogram.tolist() == [counts[value] for value in range(256)]
    assert int(histogram.sum()) == len(data)


def test_exit_codes_are_distinct() -> None:
    codes = [
        summarize.EXIT_OK,
        summarize.EXIT_USAGE,
        summarize.EXIT_NO_INPUT,
        summarize.EXIT_UNREADABLE,
        summarize.EXIT_CANNOT_WRITE,
        summarize.EXIT_TERMINATED,
    ]
    assert codes == [0, 2, 3, 6, 7, 143]


def test_reads_in_chunks_of_one_mib() -> None:
    assert summarize.CHUNK_BYTES == MIB


@pytest.mark.parametrize("data", INPUTS)
def test_summary_and_histogram_match_an_independent_recomputation(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str], data: bytes
) -> None:
    path = _stage(dirs, data)

    assert _run(path, dirs[1]) == summarize.EXIT_OK

    out, err = capsys.readouterr()
    assert (one_line(out), err) == (f"SUCCESS in3.dat -> summary.json histogram.npy {len(data)} bytes", "")
    _check_outputs(dirs[1], "in3.dat", data)
    assert sorted(os.listdir(dirs[1])) == OUTPUTS, "the two outputs only, no temp file"
    assert os.listdir(dirs[0]) == ["in3.dat"] and path.read_bytes() == data


def test_empty_input_fields(dirs: tuple[Path, Path]) -> None:
    assert _run(_stage(dirs, b""), dirs[1]) == summarize.EXIT_OK

    summary = json.loads((dirs[1] / "summary.json").read_text())
    assert summary == {
        "distinct_bytes": 0,
        "input": "in3.dat",
        "max": None,
        "mean": 0.0,
        "min": None,
        "sha256": hashlib.sha256(b"").hexdigest(),
        "size": 0,
        "zero_bytes": 0,
    }
    assert '"max": null' in (dirs[1] / "summary.json").read_text()


def test_mean_agrees_with_statistics_mean(dirs: tuple[Path, Path]) -> None:
    data = _random_bytes(100_003, seed=7)

    assert _run(_stage(dirs, data), dirs[1]) == summarize.EXIT_OK

    assert json.loads((dirs[1] / "summary.json").read_text())["mean"] == pytest.approx(statistics.mean(data), abs=1e-12)


def test_input_name_is_the_base_name(dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    nested = dirs[0] / "deep" / "er"
    nested.mkdir(parents=True)
    (nested / "task 7.bin").write_bytes(b"abc")

    assert _run(nested / "task 7.bin", dirs[1]) == summarize.EXIT_OK

    assert one_line(capsys.readouterr().out) == "SUCCESS task 7.bin -> summary.json histogram.npy 3 bytes"
    _check_outputs(dirs[1], "task 7.bin", b"abc")


def test_existing_outputs_are_replaced(dirs: tuple[Path, Path]) -> None:
    for name in OUTPUTS:
        (dirs[1] / name).write_bytes(b"stale")
    data = _random_bytes(5000, seed=8)

    assert _run(_stage(dirs, data), dirs[1]) == summarize.EXIT_OK

    _check_outputs(dirs[1], "in3.dat", data)
    assert sorted(os.listdir(dirs[1])) == OUTPUTS


def test_output_mode_follows_umask(dirs: tuple[Path, Path]) -> None:
    saved = os.umask(0o022)
    try:
        assert _run(_stage(dirs, b"x"), dirs[1]) == summarize.EXIT_OK
    finally:
        os.umask(saved)
    assert [(dirs[1] / name).stat().st_mode & 0o777 for name in OUTPUTS] == [0o644, 0o644]


def test_input_in_the_output_directory(tmp_path: Path) -> None:
    data = _random_bytes(3000, seed=9)
    (tmp_path / "in.dat").write_bytes(data)

    assert _run(tmp_path / "in.dat", tmp_path) == summarize.EXIT_OK

    _check_outputs(tmp_path, "in.dat", data)
    assert sorted(os.listdir(tmp_path)) == ["histogram.npy", "in.dat", "summary.json"]


# ---------------------------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param([], "the following arguments are required: --input, --output-dir", id="no-arguments"),
        pytest.param(["--input", "{input}"], "--output-dir", id="no-output-dir"),
        pytest.param(["--output-dir", "{output}"], "--input", id="no-input"),
        pytest.param(["--input", "", "--output-dir", "{output}"], "the path is empty", id="empty-input"),
        pytest.param(["--input", "{input}", "--output-dir", ""], "the path is empty", id="empty-output-dir"),
        pytest.param(["--input", "a\x00b", "--output-dir", "{output}"], "contains NUL", id="nul-in-input"),
        pytest.param(["--input", "{input}", "--output-dir", "{output}", "--extra"], "unrecognized", id="extra"),
        pytest.param(["--input", "{input}", "--output-dir", "{output}/absent"],
                     "output directory {output}/absent does not exist or is not a directory", id="output-dir-absent"),
        pytest.param(["--input", "{input}", "--output-dir", "{input}"],
                     "output directory {input} does not exist or is not a directory", id="output-dir-is-a-file"),
    ],
)  # fmt: skip
def test_usage_errors(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    path = _stage(dirs, b"data")
    names = {"input": path, "output": dirs[1]}

    assert summarize.main([arg.format(**names) for arg in argv]) == summarize.EXIT_USAGE

    out, err = capsys.readouterr()
    line = one_line(err)
    assert out == ""
    assert line.startswith("summarize.py: usage error:") and message.format(**names) in line, line
    assert os.listdir(dirs[1]) == []


def _make_io_error(path: Path) -> None:
    # Reading /proc/self/mem at offset 0 (an unmapped address) fails with EIO, for root too.
    path.unlink(missing_ok=True)
    path.symlink_to("/proc/self/mem")


def _keep(path: Path) -> None:
    """Leave the input as staged (the case's path suffix is what fails)."""


@pytest.mark.parametrize(
    ("damage", "suffix", "code", "message"),
    [
        pytest.param(helpers.remove, "", 3, "input {path} does not exist: stage it first", id="missing"),
        pytest.param(helpers.make_directory, "", 6, "input {path} is a directory, not a file", id="directory"),
        # Tests run as root, where chmod 000 does not stop a read; a symlink loop fails for root too.
        pytest.param(helpers.make_symlink_loop, "", 6, "cannot open input {path}: Too many levels of symbolic links",
                     id="unopenable"),
        pytest.param(_make_io_error, "", 6, "cannot read input {path}: Input/output error", id="io-error"),
        # in3.dat/x: a path through a file, ENOTDIR on open.
        pytest.param(_keep, "/x", 6, "cannot open input {path}: Not a directory",
                     id="through-a-file"),
    ],
)  # fmt: skip
def test_input_failures(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str], damage, suffix: str, code: int, message: str
) -> None:
    path = _stage(dirs, b"some data")
    damage(path)
    target = f"{path}{suffix}"

    assert _run(target, dirs[1]) == code

    out, err = capsys.readouterr()
    assert out == ""
    assert one_line(err) == "summarize.py: " + message.format(path=target)
    assert os.listdir(dirs[1]) == [], "no output and no temp file may remain"


def test_permission_denied_is_unreadable(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Root reads a mode-000 file, so the refusal is simulated where the program opens its input.
    path = _stage(dirs, b"secret")

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(summarize, "open", denied, raising=False)
    code = _run(path, dirs[1])
    monkeypatch.undo()

    assert code == summarize.EXIT_UNREADABLE
    assert one_line(capsys.readouterr().err) == f"summarize.py: cannot open input {path}: Permission denied"
    assert os.listdir(dirs[1]) == []


@pytest.mark.parametrize("blocked", OUTPUTS)
def test_output_name_taken_by_a_directory_cannot_be_written(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str], blocked: str
) -> None:
    (dirs[1] / blocked).mkdir()
    for name in OUTPUTS:
        if name != blocked:
            (dirs[1] / name).write_bytes(b"previous")

    assert _run(_stage(dirs, b"data"), dirs[1]) == summarize.EXIT_CANNOT_WRITE

    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"summarize.py: cannot write output {dirs[1]}/{blocked}:"), line
    assert sorted(os.listdir(dirs[1])) == OUTPUTS, "the temp files must be removed"
    assert (dirs[1] / blocked).is_dir()


def test_write_failure_leaves_no_temp_and_keeps_existing_outputs(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in OUTPUTS:
        (dirs[1] / name).write_bytes(b"previous output")

    def failing(call: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    path = _stage(dirs, _random_bytes(10_000, seed=10))
    with helpers.fsync_replaced(monkeypatch, summarize, failing) as fsync:
        code = _run(path, dirs[1])

    assert code == summarize.EXIT_CANNOT_WRITE
    assert fsync.calls, "each temp file must be fsynced before it is published"
    assert one_line(capsys.readouterr().err) == (
        f"summarize.py: cannot write output {dirs[1]}/histogram.npy: Input/output error"
    )
    assert sorted(os.listdir(dirs[1])) == OUTPUTS
    assert [(dirs[1] / name).read_bytes() for name in OUTPUTS] == [b"previous output"] * 2


def test_second_output_failing_removes_both_temp_files(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """summary.json fails after histogram.npy's temp is complete: neither is published, no temp remains."""

    def second_fails(call: int) -> None:
        if call == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    path = _stage(dirs, b"data")
    with helpers.fsync_replaced(monkeypatch, summarize, second_fails):
        code = _run(path, dirs[1])

    assert code == summarize.EXIT_CANNOT_WRITE
    assert "summary.json: No space left on device" in one_line(capsys.readouterr().err)
    assert os.listdir(dirs[1]) == []


def test_sigterm_while_writing_removes_the_temp_files(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGTERM that arrives while the outputs are written (simulated at the second fsync) leaves nothing."""

    def terminated_at_second(call: int) -> None:
        if call == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    path = _stage(dirs, _random_bytes(5000, seed=11))
    with helpers.fsync_replaced(monkeypatch, summarize, terminated_at_second):
        code = _run(path, dirs[1])

    assert code == summarize.EXIT_TERMINATED
    out, err = capsys.readouterr()
    assert out == ""
    assert one_line(err) == "summarize.py: stopped by SIGTERM before the run completed"
    assert os.listdir(dirs[1]) == []
    assert signal.getsignal(signal.SIGTERM) is not summarize._on_sigterm, "the handler must be restored"


def test_sigterm_stops_the_run_without_output(dirs: tuple[Path, Path]) -> None:
    """A run blocked on its input (a FIFO with a silent writer) stops on SIGTERM with 143 and leaves nothing."""
    fifo = dirs[0] / "in3.dat"
    os.mkfifo(fifo)

    code, out, err = helpers.terminate_while_reading(
        [sys.executable, "-B", str(SCRIPT), "--input", str(fifo), "--output-dir", str(dirs[1])],
        fifo,
        "summarize.py",
        written=b"part of the input",
    )

    assert code == summarize.EXIT_TERMINATED
    assert out == ""
    assert one_line(err) == "summarize.py: stopped by SIGTERM before the run completed"
    assert os.listdir(dirs[1]) == []


# ---------------------------------------------------------------------------------------------- as a program


def test_runs_as_a_script(dirs: tuple[Path, Path]) -> None:
    data = _random_bytes(MIB + 17, seed=12)
    path = _stage(dirs, data)

    result = helpers.run_script([sys.executable, "-B", str(SCRIPT), "--input", str(path), "--output-dir", str(dirs[1])])

    expected = (0, f"SUCCESS in3.dat -> summary.json histogram.npy {MIB + 17} bytes\n", "")
    assert (result.returncode, result.stdout, result.stderr) == expected
    _check_outputs(dirs[1], "in3.dat", data)


def _peak_rss_kib(argv: list[str]) -> int:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dummy, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, proc.stderr.read()
    proc.stderr.close()
    return usage.ru_maxrss


def test_memory_stays_flat(tmp_path: Path) -> None:
    """A 64 MiB input costs no more memory than a tiny one, within a few chunks."""
    small, large = tmp_path / "small.dat", tmp_path / "large.dat"
    small.write_bytes(b"x")
    with open(large, "wb") as out:
        for seed in range(64):
            out.write(_random_bytes(MIB, seed=seed))
    argv = [sys.executable, "-B", str(SCRIPT), "--output-dir", str(tmp_path), "--input"]

    baseline = _peak_rss_kib(argv + [str(small)])
    peak = _peak_rss_kib(argv + [str(large)])

    assert peak - baseline < 16 * 1024, f"peak RSS grew by {peak - baseline} KiB for a 64 MiB input"
