"""Tests of container/process.py: the XOR, the command line and its exit codes, atomic output, the real image."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from ansible_collections.cicc.cloud.plugins.module_utils import dataset
from ansible_collections.cicc.cloud.tests.unit.container import helpers
from ansible_collections.cicc.cloud.tests.unit.container.helpers import one_line

SCRIPT = helpers.ROOT / "container" / "process.py"
IMAGE = os.environ.get("CICC_PROCESS_IMAGE", "cicc-process:latest")

process = helpers.load_program("cicc_container_process", SCRIPT)


def _reference(data: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """The collection's reference XOR (the one the outputs are checked with), for the container's fast one."""
    return np.frombuffer(dataset.xor_tiled(data.tobytes(), kernel.tobytes()), dtype=np.uint8)


def _random(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- xor_with_kernel

XOR_CASES = [
    # (input length, kernel length)
    pytest.param(3000, 1000, id="multiple-of-kernel"),
    pytest.param(2_000_000, 1000, id="seed-size"),
    pytest.param(2500, 1000, id="not-a-multiple"),
    pytest.param(999, 1000, id="shorter-than-kernel"),
    pytest.param(1, 1000, id="one-byte-input"),
    pytest.param(0, 1000, id="empty-input"),
    pytest.param(12_345, 1, id="kernel-of-one-byte"),
    pytest.param(0, 1, id="empty-input-one-byte-kernel"),
    pytest.param(100_003, 7, id="short-odd-kernel"),
    pytest.param(65_000 * 3, 1000, id="whole-tiled-blocks"),
    pytest.param(65_000 * 3 + 999, 1000, id="tiled-blocks-plus-tail"),
    pytest.param(150_001, 70_000, id="kernel-longer-than-a-block"),
    pytest.param(50_000, 70_000, id="long-kernel-truncated"),
]


@pytest.mark.parametrize(("size", "kernel_size"), XOR_CASES)
def test_xor_with_kernel_matches_reference(size: int, kernel_size: int) -> None:
    data = _random(size, seed=size)
    kernel = _random(kernel_size, seed=kernel_size + 1)
    expected = _reference(data, kernel)

    result = process.xor_with_kernel(data, kernel)

    assert result is data, "the XOR must run in place"
    assert result.dtype == np.uint8 and result.shape == (size,)
    np.testing.assert_array_equal(result, expected)


@pytest.mark.parametrize(("size", "kernel_size"), XOR_CASES)
def test_xor_with_kernel_is_its_own_inverse(size: int, kernel_size: int) -> None:
    original = _random(size, seed=size + 2)
    kernel = _random(kernel_size, seed=kernel_size + 3)

    twice = process.xor_with_kernel(process.xor_with_kernel(original.copy(), kernel), kernel)

    np.testing.assert_array_equal(twice, original)


def test_xor_with_empty_kernel_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        process.xor_with_kernel(np.zeros(10, dtype=np.uint8), np.zeros(0, dtype=np.uint8))


# ---------------------------------------------------------------------------------------------- command line


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A data directory staged like a task: a 2,500-byte input (not a multiple) and a 1,000-byte kernel."""
    (tmp_path / "in3.dat").write_bytes(_random(2500, seed=3).tobytes())
    (tmp_path / "kernel.dat").write_bytes(_random(1000, seed=4).tobytes())
    return tmp_path


def _run(work: Path, *, input: str = "in3.dat", kernel: str = "kernel.dat", output: str = "out3.dat") -> int:
    return process.main(["--data", str(work), "--input", input, "--kernel", kernel, "--output", output])


def _expected(work: Path, input: str = "in3.dat", kernel: str = "kernel.dat") -> bytes:
    data = np.fromfile(work / input, dtype=np.uint8)
    return _reference(data, np.fromfile(work / kernel, dtype=np.uint8)).tobytes()


def test_exit_codes_are_distinct() -> None:
    codes = [
        process.EXIT_OK,
        process.EXIT_USAGE,
        process.EXIT_NO_INPUT,
        process.EXIT_NO_KERNEL,
        process.EXIT_EMPTY_KERNEL,
        process.EXIT_UNREADABLE,
        process.EXIT_CANNOT_WRITE,
        process.EXIT_TERMINATED,
    ]
    assert codes == [0, 2, 3, 4, 5, 6, 7, 143]


def test_success_writes_output_and_one_success_line(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = set(os.listdir(work))

    assert _run(work) == process.EXIT_OK

    out, err = capsys.readouterr()
    assert one_line(out) == "SUCCESS in3.dat -> out3.dat 2500 bytes"
    assert err == ""
    assert (work / "out3.dat").read_bytes() == _expected(work)
    assert set(os.listdir(work)) == before | {"out3.dat"}, "no temp file may remain"


def test_output_mode_follows_umask(work: Path) -> None:
    saved = os.umask(0o022)
    try:
        assert _run(work) == process.EXIT_OK
    finally:
        os.umask(saved)
    assert (work / "out3.dat").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    ("input_size", "kernel_size"),
    [
        pytest.param(0, 1000, id="empty-input"),
        pytest.param(999, 1000, id="kernel-longer-than-input"),
        pytest.param(3000, 1000, id="multiple-of-kernel"),
        pytest.param(3001, 1, id="kernel-of-one-byte"),
    ],
)
def test_tiling_rule_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], input_size: int, kernel_size: int
) -> None:
    (tmp_path / "in.dat").write_bytes(_random(input_size, seed=5).tobytes())
    (tmp_path / "k.dat").write_bytes(_random(kernel_size, seed=6).tobytes())

    assert _run(tmp_path, input="in.dat", kernel="k.dat", output="out.dat") == process.EXIT_OK

    assert one_line(capsys.readouterr().out) == f"SUCCESS in.dat -> out.dat {input_size} bytes"
    assert (tmp_path / "out.dat").read_bytes() == _expected(tmp_path, "in.dat", "k.dat")


def test_existing_output_is_replaced_on_success(work: Path) -> None:
    (work / "out3.dat").write_bytes(b"stale output from an earlier attempt")

    assert _run(work) == process.EXIT_OK

    assert (work / "out3.dat").read_bytes() == _expected(work)


BAD_NAMES = [
    pytest.param("../x", id="parent"),
    pytest.param("..", id="dotdot"),
    pytest.param("a..b", id="embedded-dotdot"),
    pytest.param("a/b", id="slash"),
    pytest.param("/etc/passwd", id="absolute"),
    pytest.param("a\\b", id="backslash"),
    pytest.param("", id="empty"),
    pytest.param(".", id="dot"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("a\nb", id="newline"),
    pytest.param("a\x7fb", id="del"),
    pytest.param("x" * 201, id="too-long"),
]


@pytest.mark.parametrize("option", ["input", "kernel", "output"])
@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_name_is_a_usage_error(work: Path, capsys: pytest.CaptureFixture[str], option: str, name: str) -> None:
    before = set(os.listdir(work))

    assert _run(work, **{option: name}) == process.EXIT_USAGE

    out, err = capsys.readouterr()
    assert out == ""
    line = one_line(err)
    assert line.startswith("process.py: usage error: argument --" + option), line
    assert set(os.listdir(work)) == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param([], "the following arguments are required", id="no-arguments"),
        pytest.param(["--input", "in3.dat"], "--kernel, --output", id="missing-options"),
        pytest.param(["--data", "{work}/absent", "--input", "in3.dat", "--kernel", "kernel.dat", "--output", "o"],
                     "data directory", id="absent-data-directory"),
        pytest.param(["--data", "{work}", "--input", "in3.dat", "--kernel", "kernel.dat", "--output", "in3.dat"],
                     "must differ", id="output-overwrites-input"),
        pytest.param(["--data", "{work}", "--input", "in3.dat", "--kernel", "kernel.dat", "--output", "kernel.dat"],
                     "must differ", id="output-overwrites-kernel"),
    ],
)  # fmt: skip
def test_usage_errors(work: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    before = {name: (work / name).read_bytes() for name in os.listdir(work)}

    assert process.main([arg.format(work=work) for arg in argv]) == process.EXIT_USAGE

    line = one_line(capsys.readouterr().err)
    assert line.startswith("process.py: usage error:") and message in line, line
    assert {name: (work / name).read_bytes() for name in os.listdir(work)} == before


def _make_growing(path: Path) -> None:
    # /proc files report size 0 but have content: the same as a file appended to while it is read.
    path.unlink(missing_ok=True)
    path.symlink_to("/proc/self/status")


def _make_empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize(
    ("target", "damage", "code", "message"),
    [
        pytest.param("in3.dat", helpers.remove, 3, "input {work}/in3.dat does not exist", id="missing-input"),
        pytest.param("kernel.dat", helpers.remove, 4, "kernel {work}/kernel.dat does not exist", id="missing-kernel"),
        pytest.param("kernel.dat", _make_empty, 5, "kernel {work}/kernel.dat is empty", id="empty-kernel"),
        pytest.param(
            "in3.dat", helpers.make_directory, 6, "input {work}/in3.dat is a directory", id="input-is-directory"
        ),
        pytest.param(
            "kernel.dat", helpers.make_directory, 6, "kernel {work}/kernel.dat is a directory", id="kernel-is-dir"
        ),
        # Tests run as root, where chmod 000 does not stop a read; a symlink loop fails for root too.
        pytest.param("in3.dat", helpers.make_symlink_loop, 6, "cannot open input", id="input-unreadable"),
        pytest.param("kernel.dat", helpers.make_symlink_loop, 6, "cannot open kernel", id="kernel-unreadable"),
        pytest.param("in3.dat", _make_growing, 6, "grew while being read", id="input-changed-while-read"),
    ],
)
def test_input_and_kernel_failures(
    work: Path,
    capsys: pytest.CaptureFixture[str],
    target: str,
    damage,
    code: int,
    message: str,
) -> None:
    damage(work / target)
    before = set(os.listdir(work))

    assert _run(work) == code

    out, err = capsys.readouterr()
    assert out == ""
    line = one_line(err)
    assert line.startswith("process.py: ") and message.format(work=work) in line, line
    assert set(os.listdir(work)) == before, "no output and no temp file may remain"


def test_missing_input_is_reported_before_a_bad_kernel(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (work / "in3.dat").unlink()
    (work / "kernel.dat").write_bytes(b"")

    assert _run(work) == process.EXIT_NO_INPUT
    assert "input" in capsys.readouterr().err


def test_output_that_is_a_directory_cannot_be_written(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (work / "out3.dat").mkdir()
    before = set(os.listdir(work))

    assert _run(work) == process.EXIT_CANNOT_WRITE

    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"process.py: cannot write output {work}/out3.dat:"), line
    assert (work / "out3.dat").is_dir()
    assert set(os.listdir(work)) == before, "the temp file must be removed"


def test_write_failure_leaves_no_temp_and_keeps_existing_output(
    work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (work / "out3.dat").write_bytes(b"previous output")
    before = set(os.listdir(work))

    def failing(call: int) -> None:
        raise OSError(5, "Input/output error")

    # The data is fully written to the temp file when fsync fails: the last moment before publishing.
    with helpers.fsync_replaced(monkeypatch, process, failing) as fsync:
        code = _run(work)

    assert code == process.EXIT_CANNOT_WRITE
    assert fsync.calls, "the temp file must be fsynced before it is published"
    assert "Input/output error" in one_line(capsys.readouterr().err)
    assert (work / "out3.dat").read_bytes() == b"previous output"
    assert set(os.listdir(work)) == before


@pytest.mark.parametrize(
    ("target", "damage"),
    [
        pytest.param("in3.dat", helpers.remove, id="missing-input"),
        pytest.param("kernel.dat", _make_empty, id="empty-kernel"),
        pytest.param("in3.dat", helpers.make_directory, id="input-is-directory"),
    ],
)
def test_failure_keeps_existing_output(work: Path, target: str, damage) -> None:
    (work / "out3.dat").write_bytes(b"previous output")
    damage(work / target)

    assert _run(work) != process.EXIT_OK

    assert (work / "out3.dat").read_bytes() == b"previous output"


def _script_argv(work: Path) -> list[str]:
    """process.py run by this interpreter on the ``work`` fixture's task."""
    argv = [sys.executable, str(SCRIPT), "--data", str(work), "--input", "in3.dat", "--kernel", "kernel.dat"]
    return argv + ["--output", "out3.dat"]


def test_sigterm_stops_the_run_without_output(work: Path) -> None:
    """A run blocked on its input (a FIFO nobody writes to) stops on SIGTERM with 143 and leaves nothing."""
    fifo = work / "in3.dat"
    fifo.unlink()
    os.mkfifo(fifo)
    before = set(os.listdir(work))

    code, out, err = helpers.terminate_while_reading(_script_argv(work), fifo, "process.py")

    assert code == process.EXIT_TERMINATED
    assert out == ""
    assert one_line(err) == "process.py: stopped by SIGTERM before the run completed"
    assert set(os.listdir(work)) == before


def test_runs_as_a_script(work: Path) -> None:
    result = helpers.run_script(_script_argv(work))

    assert (result.returncode, result.stdout, result.stderr) == (0, "SUCCESS in3.dat -> out3.dat 2500 bytes\n", "")
    assert (work / "out3.dat").read_bytes() == _expected(work)


# ---------------------------------------------------------------------------------------------- separate directories


@pytest.fixture
def job(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A job's layout: the input in input/, the kernel in shared/, an empty output/."""
    input_dir, shared_dir, output_dir = helpers.make_dirs(tmp_path, "input", "shared", "output")
    (input_dir / "in3.dat").write_bytes(_random(2500, seed=10).tobytes())
    (shared_dir / "kernel.dat").write_bytes(_random(1000, seed=11).tobytes())
    return input_dir, shared_dir, output_dir


def _job_argv(input_dir: Path, shared_dir: Path, output_dir: Path, output: str = "out3.dat") -> list[str]:
    inputs = ["--data", str(input_dir), "--input", "in3.dat", "--kernel-dir", str(shared_dir), "--kernel", "kernel.dat"]
    return inputs + ["--output-dir", str(output_dir), "--output", output]


def _snapshot(*directories: Path) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for directory in directories for path in sorted(directory.iterdir())}


def _job_expected(input_dir: Path, shared_dir: Path) -> bytes:
    data = np.fromfile(input_dir / "in3.dat", dtype=np.uint8)
    return _reference(data, np.fromfile(shared_dir / "kernel.dat", dtype=np.uint8)).tobytes()


def test_separate_directories(job: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    input_dir, shared_dir, output_dir = job
    before = _snapshot(input_dir, shared_dir)

    assert process.main(_job_argv(*job)) == process.EXIT_OK

    out, err = capsys.readouterr()
    assert (one_line(out), err) == ("SUCCESS in3.dat -> out3.dat 2500 bytes", "")
    assert os.listdir(output_dir) == ["out3.dat"], "the output only, no temp file"
    assert (output_dir / "out3.dat").read_bytes() == _job_expected(input_dir, shared_dir)
    assert _snapshot(input_dir, shared_dir) == before, "nothing may change in the input or kernel directory"


def test_separate_directories_create_files_only_in_the_output_dir(
    job: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not even a temp file that is removed again appears outside the output directory."""
    input_dir, shared_dir, output_dir = job
    created: list[str] = []
    real_open = os.open

    def spying_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            created.append(os.path.dirname(os.fspath(path)))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(process.os, "open", spying_open)
    assert process.main(_job_argv(*job)) == process.EXIT_OK
    monkeypatch.undo()

    assert created == [str(output_dir)]


def test_run_takes_the_directories_as_keywords(job: tuple[Path, Path, Path]) -> None:
    input_dir, shared_dir, output_dir = job

    size = process.run(
        str(input_dir), "in3.dat", "kernel.dat", "o.dat", kernel_dir=str(shared_dir), output_dir=str(output_dir)
    )

    assert size == 2500
    assert (output_dir / "o.dat").read_bytes() == _job_expected(input_dir, shared_dir)


def test_output_may_take_the_input_or_kernel_name_in_another_directory(job: tuple[Path, Path, Path]) -> None:
    input_dir, shared_dir, output_dir = job
    before = _snapshot(input_dir, shared_dir)

    assert process.main(_job_argv(*job, output="in3.dat")) == process.EXIT_OK
    assert process.main(_job_argv(*job, output="kernel.dat")) == process.EXIT_OK

    assert sorted(os.listdir(output_dir)) == ["in3.dat", "kernel.dat"]
    assert (output_dir / "in3.dat").read_bytes() == _job_expected(input_dir, shared_dir)
    assert _snapshot(input_dir, shared_dir) == before


def test_defaults_put_kernel_and_output_in_the_data_directory(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --kernel-dir and --output-dir everything is in --data, exactly as before they existed."""
    args = process.build_parser().parse_args(["--data", str(work), "--input", "a", "--kernel", "b", "--output", "c"])
    assert (args.kernel_dir, args.output_dir) == (None, None)

    assert _run(work) == process.EXIT_OK

    assert one_line(capsys.readouterr().out) == "SUCCESS in3.dat -> out3.dat 2500 bytes"
    assert sorted(os.listdir(work)) == ["in3.dat", "kernel.dat", "out3.dat"]
    assert (work / "out3.dat").read_bytes() == _expected(work)


def test_explicit_directories_equal_to_data_behave_as_the_defaults(work: Path) -> None:
    argv = ["--data", str(work), "--input", "in3.dat", "--kernel-dir", str(work), "--kernel", "kernel.dat"]

    assert process.main(argv + ["--output-dir", str(work), "--output", "out3.dat"]) == process.EXIT_OK
    assert (work / "out3.dat").read_bytes() == _expected(work)


def _same_directory_spellings(work: Path) -> dict[str, str]:
    link = work.parent / (work.name + "-link")
    link.symlink_to(work)
    return {"trailing-slash": str(work) + "/", "dot-segment": f"{work}/./", "symlink": str(link)}


@pytest.mark.parametrize("spelling", ["trailing-slash", "dot-segment", "symlink"])
@pytest.mark.parametrize("target", ["in3.dat", "kernel.dat"])
def test_output_on_the_same_path_as_input_or_kernel_is_refused(
    work: Path, capsys: pytest.CaptureFixture[str], spelling: str, target: str
) -> None:
    output_dir = _same_directory_spellings(work)[spelling]
    before = _snapshot(work)
    argv = ["--data", str(work), "--input", "in3.dat", "--kernel-dir", str(work), "--kernel", "kernel.dat"]

    assert process.main(argv + ["--output-dir", output_dir, "--output", target]) == process.EXIT_USAGE

    line = one_line(capsys.readouterr().err)
    assert line.startswith("process.py: usage error: output ") and "must differ" in line, line
    assert _snapshot(work) == before


@pytest.mark.parametrize(
    ("role", "option"),
    [pytest.param("kernel", "--kernel-dir", id="kernel-dir"), pytest.param("output", "--output-dir", id="output-dir")],
)
@pytest.mark.parametrize("kind", ["absent", "a-file"])
def test_missing_kernel_or_output_directory_is_a_usage_error(
    job: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str], role: str, option: str, kind: str
) -> None:
    input_dir, shared_dir, output_dir = job
    bad = input_dir.parent / "absent"
    if kind == "a-file":
        bad.write_bytes(b"not a directory")
    argv = _job_argv(*job)
    argv[argv.index(option) + 1] = str(bad)
    before = _snapshot(input_dir, shared_dir, output_dir)

    assert process.main(argv) == process.EXIT_USAGE

    out, err = capsys.readouterr()
    assert out == ""
    assert one_line(err) == f"process.py: usage error: {role} directory {bad} does not exist or is not a directory"
    assert _snapshot(input_dir, shared_dir, output_dir) == before


def test_missing_kernel_names_the_kernel_directory(
    job: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    input_dir, shared_dir, output_dir = job
    (shared_dir / "kernel.dat").unlink()

    assert process.main(_job_argv(*job)) == process.EXIT_NO_KERNEL

    line = one_line(capsys.readouterr().err)
    assert line == f"process.py: kernel {shared_dir}/kernel.dat does not exist: stage it in the kernel directory first"
    assert os.listdir(output_dir) == []


def test_write_failure_in_the_output_directory_leaves_nothing(
    job: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    input_dir, shared_dir, output_dir = job
    (output_dir / "out3.dat").mkdir()
    before = _snapshot(input_dir, shared_dir)

    assert process.main(_job_argv(*job)) == process.EXIT_CANNOT_WRITE

    assert one_line(capsys.readouterr().err).startswith(f"process.py: cannot write output {output_dir}/out3.dat:")
    assert os.listdir(output_dir) == ["out3.dat"] and (output_dir / "out3.dat").is_dir()
    assert _snapshot(input_dir, shared_dir) == before
