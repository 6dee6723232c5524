"""The claim protocol's rules on names and tasklists, without S3 (the protocol against S3 is in
tests/integration/test_task_queue.py)."""

from __future__ import annotations

import pytest

from ansible_collections.cicc.cloud.plugins.module_utils import task_queue as tq

# --- names and lists ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, problem",
    [
        ("in3.dat", None),
        ("A_b-c+1.x", None),
        ("../etc/passwd", "path separator"),
        ("/abs.dat", "path separator"),
        ("a//b", "path separator"),
        ("a\\b", "path separator"),
        ("in\n3.dat", "control character"),
        ("in\x003.dat", "control character"),
        ("s3://other-bucket/in1.dat", "path separator"),
        ("x" * 1025, "longer than"),
        (".hidden", "must start with a letter or digit"),
        ("-rf", "must start with a letter or digit"),
        ("in 3.dat", "may hold only"),
        ("tasklist.txt", "name of a queue list"),
        ("", "empty"),
    ],
)
def test_name_problem(name, problem):
    found = tq.name_problem(name)
    assert (found is None) if problem is None else (problem in found)


@pytest.mark.parametrize(
    "raw, names, rejected",
    [
        (b"in3.dat\nin4.dat\n", ["in3.dat", "in4.dat"], []),
        (b"in3.dat\r\nin4.dat\r\n", ["in3.dat", "in4.dat"], []),  # CRLF
        (b"\xef\xbb\xbfin3.dat\n", ["in3.dat"], []),  # BOM
        (b"in3.dat   \n\n\n  in4.dat", ["in3.dat", "in4.dat"], []),  # spaces, blanks, no final newline
        (b"# to do\nin3.dat\n", ["in3.dat"], []),  # comments
        (b"in3.dat\nin3.dat\n", ["in3.dat"], []),  # duplicates
        (b"in3.dat\n\xff\xfe.dat\n", ["in3.dat"], ["not UTF-8"]),
        (b"../x\nin3.dat\n", ["in3.dat"], ["path separator"]),
        (b"x" * 5000 + b"\nin3.dat\n", ["in3.dat"], ["longer than"]),
        (b"", [], []),
    ],
)
def test_parse_tasklist(raw, names, rejected):
    parsed = tq.parse_tasklist(raw)
    assert parsed.names == names
    reasons = [reason for line, reason in parsed.rejected]
    assert len(reasons) == len(rejected)
    assert all(expected in reason for expected, reason in zip(rejected, reasons))


@pytest.mark.parametrize(
    "attempts, error, fail_now, outcome",
    [
        (1, "exit 1", False, "pending"),
        (2, "exit 1", False, "failed"),
        (2, "", False, "pending"),
        (1, "", True, "failed"),
    ],
)
def test_release_outcome_says_what_a_release_leaves(attempts, error, fail_now, outcome):
    """The prediction task_release's check mode gives, and the rule release() itself follows (2 attempts allowed)."""
    lease = tq.Lease("in1.dat", "w1", "token", '"etag"', attempts)
    assert tq.release_outcome(tq.Queue("bucket", max_attempts=2), lease, error, fail_now) == outcome
