"""The job file: the example jobs load, placeholders expand, and every bad job says where and what to do."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ansible_collections.cicc.cloud.plugins.filter import job as job_filter
from ansible_collections.cicc.cloud.plugins.module_utils import job

ROOT = Path(__file__).resolve().parents[4]


def _example(name: str) -> dict:
    return yaml.safe_load((ROOT / "jobs" / name).read_text())["cicc_job"]


@pytest.fixture
def xor() -> job.Job:
    return job.load(_example("xor.yml"))


@pytest.fixture
def summary() -> job.Job:
    return job.load(_example("summary.yml"))


def _minimal(**fields) -> dict:
    data = {"name": "t", "bucket": "cicc-test", "image": {"name": "img:1"}, "command": ["run", "{input}"]}
    data.update(fields)
    return data


# --- the examples -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["xor.yml", "summary.yml"])
def test_example_jobs_load_and_round_trip(name):
    data = _example(name)
    assert job.problems(data) == []
    loaded = job.load(data)
    as_dict = loaded.as_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict  # JSON-able, as job.json
    assert job.load(as_dict) == loaded
    assert job.load(json.loads(json.dumps(as_dict))) == loaded


def test_xor_job_fields(xor):
    assert (xor.name, xor.bucket, xor.prefix, xor.input_prefix, xor.output_prefix) == (
        "xor",
        "cicc-demo-bucket",
        "",
        "",
        "",
    )
    assert xor.shared == ("kernel.dat",)
    assert xor.job_key == "job.json"
    assert xor.input_key("in3.dat") == "in3.dat"
    assert xor.shared_key("kernel.dat") == "kernel.dat"
    assert xor.image_archive_key == ""
    assert xor.dataset == (
        ("inputs", 10),
        ("input_size", 2000000),
        ("kernel_size", 1000),
        ("done", 3),
        ("seed", 121325),
    )
    assert xor.cpus == 1.0 and isinstance(xor.cpus, float)
    with pytest.raises(job.JobError, match="not listed in shared"):
        xor.shared_key("other.dat")


def test_summary_job_fields(summary):
    assert summary.job_key == "summary/job.json"
    assert summary.input_prefix == ""  # inputs.prefix "" is given: the XOR job's inputs, not summary/
    assert summary.output_prefix == "summary/results/"
    assert summary.image_archive_key == "summary/images/cicc-summary.tar"
    assert (summary.tasks_source, summary.tasks_pattern) == ("inputs", "in*.dat")
    assert summary.dataset is None and summary.output_name_rule is None


def test_defaults_are_explicit_and_prefixes_resolve():
    loaded = job.load(_minimal(prefix="p/"))
    data = loaded.as_dict()
    assert data["inputs"] == {"prefix": "p/"} and data["outputs"]["prefix"] == "p/"
    assert data["tasks"] == {"source": "tasklist", "pattern": "*"}
    assert data["image"] == {"name": "img:1", "source": "baked", "archive": "", "digest": ""}
    assert (data["cpus"], data["memory_mib"], data["timeout_seconds"]) == (1.0, 512, 900)
    assert data["retry"] == {"attempts": 3, "evaluate_on_exit": []}
    assert data["outputs"]["key"] == "{task}/{file}" and data["outputs"]["name"] is None
    assert data["env"] == {} and data["shared"] == [] and data["dataset"] is None
    assert job.load(data) == loaded


# --- placeholders, names and keys -----------------------------------------------------------------


def test_xor_argv_for_in3(xor):
    assert xor.argv("in3.dat") == [
        "--data", "/cicc/input", "--input", "in3.dat", "--kernel-dir", "/cicc/shared", "--kernel", "kernel.dat",
        "--output-dir", "/cicc/output", "--output", "out3.dat",
    ]  # fmt: skip


def test_summary_argv_for_in3(summary):
    assert summary.argv("in3.dat") == ["--input", "/cicc/input/in3.dat", "--output-dir", "/cicc/output"]


def test_every_placeholder_and_literal_braces():
    data = _minimal(
        shared=["kernel.dat", "b.bin"],
        command=["{input}", "{input_dir}", "{task}", "{stem}", "{output_dir}", "{output_name}", "{shared_dir}",
                 "{shared[b.bin]}", "{{literal}} {task}-x", "json={{\"a\": 1}}"],
        env={"IN": "{input}", "STEM": "{stem}", "K": "{shared[kernel.dat]}", "PLAIN": "3"},
        outputs={"name": {"pattern": r"in(\d+)\.dat", "replacement": r"out\1.dat"}},
    )  # fmt: skip
    loaded = job.load(data)
    assert loaded.argv("in3.dat") == [
        "/cicc/input/in3.dat", "/cicc/input", "in3.dat", "in3", "/cicc/output", "out3.dat", "/cicc/shared",
        "/cicc/shared/b.bin", "{literal} in3.dat-x", 'json={"a": 1}',
    ]  # fmt: skip
    assert loaded.environment("in3.dat") == {
        "IN": "/cicc/input/in3.dat",
        "K": "/cicc/shared/kernel.dat",
        "PLAIN": "3",
        "STEM": "in3",
    }
    assert loaded.env == (("IN", "{input}"), ("K", "{shared[kernel.dat]}"), ("PLAIN", "3"), ("STEM", "{stem}"))


@pytest.mark.parametrize(("task", "stem"), [("in3.dat", "in3"), ("a.b.c", "a.b"), ("noext", "noext")])
def test_stem(task, stem):
    assert job.load(_minimal(command=["{stem}"])).argv(task) == [stem]


def test_no_attribute_access_through_placeholders():
    assert "is not a placeholder" in " ".join(job.problems(_minimal(command=["{task.__class__}"])))
    assert "is not a placeholder" in " ".join(job.problems(_minimal(command=["{task[0]}"])))


def test_xor_output_names(xor):
    assert xor.output_name("in3.dat") == "out3.dat"
    assert xor.output_name("foo") == "out_foo"
    assert xor.output_key("in3.dat", "out3.dat") == "out3.dat"
    assert xor.output_key("foo", "out_foo") == "out_foo"


def test_summary_output_names_and_keys(summary):
    assert summary.output_name("in3.dat") == "in3.dat"  # no outputs.name: the task name
    assert summary.output_key("in3.dat", "summary.json") == "summary/results/in3.dat/summary.json"
    assert summary.output_key("in3.dat", "hist/bytes.json") == "summary/results/in3.dat/hist/bytes.json"


def test_otherwise_uses_stem():
    rule = {"pattern": "^in(.+)$", "replacement": r"out\1", "otherwise": "{stem}.out"}
    loaded = job.load(_minimal(outputs={"name": rule}))
    assert loaded.output_name("x.dat") == "x.out"
    assert (
        job.load(_minimal(outputs={"name": {"pattern": "(?P<n>.+)", "replacement": r"o\g<n>"}})).output_name("a")
        == "oa"
    )


@pytest.mark.parametrize("file", ["../x", "/abs", "a//b", "", "a/../../b", "dir/"])
def test_output_key_refuses_unsafe_files(summary, file):
    with pytest.raises(job.JobError):
        summary.output_key("in3.dat", file)


@pytest.mark.parametrize("task", ["../in3.dat", "a/b", "", ".hidden", "tasklist.txt"])
def test_bad_task_names_are_refused(summary, task):
    with pytest.raises(job.JobError):
        summary.input_key(task)
    with pytest.raises(job.JobError):
        summary.argv(task)


def test_output_name_must_stay_a_plain_name():
    loaded = job.load(_minimal(outputs={"name": {"pattern": "(.+)", "replacement": r"../\1"}}))
    with pytest.raises(job.JobError, match="fix outputs.name"):
        loaded.output_name("in3.dat")


# --- on_exit ---------------------------------------------------------------------------------------


def test_xor_on_exit(xor):
    assert [xor.on_exit(code) for code in (1, 2, 3, 4, 5, 6, 137)] == ["retry", "fail", "fail", "fail", "fail"] + [
        "retry"
    ] * 2


def test_on_exit_first_match_wins_and_globs():
    rules = [
        {"on_exit_code": "137", "action": "retry"},
        {"on_exit_code": "1*", "action": "fail"},
        {"on_exit_code": 2, "action": "fail"},
        {"on_exit_code": "*", "action": "retry"},
    ]
    loaded = job.load(_minimal(retry={"evaluate_on_exit": rules}))
    assert loaded.evaluate_on_exit == (("137", "retry"), ("1*", "fail"), ("2", "fail"), ("*", "retry"))
    assert loaded.on_exit(137) == "retry"  # first match wins over "1*"
    assert [loaded.on_exit(code) for code in (1, 13, 10, 199, 100)] == ["fail"] * 5
    assert loaded.on_exit(2) == "fail"
    assert loaded.on_exit(3) == "retry" and loaded.on_exit(255) == "retry"
    catch_all = job.load(_minimal(retry={"evaluate_on_exit": [{"on_exit_code": "*", "action": "fail"}]}))
    assert catch_all.on_exit(1) == catch_all.on_exit(250) == "fail"
    assert job.load(_minimal()).on_exit(1) == "retry"  # no rule: retry
    exact = job.load(_minimal(retry={"evaluate_on_exit": [{"on_exit_code": "12", "action": "fail"}]}))
    assert (exact.on_exit(12), exact.on_exit(1), exact.on_exit(120)) == ("fail", "retry", "retry")


# --- bad jobs ----------------------------------------------------------------------------------------

SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"

BAD = [
    # (change to the minimal job, field path, fragment of the advice)
    ({"name": "My_Job"}, "name", "1 to 32 of a-z 0-9 -"),
    ({"name": "a" * 33}, "name", "1 to 32"),
    ({"bucket": "ab"}, "bucket", "3 to 63"),
    ({"bucket": "Cicc-Bucket"}, "bucket", "lower-case letters, digits, . and - only"),
    ({"bucket": "a..b"}, "bucket", "two dots"),
    ({"bucket": "192.168.1.10"}, "bucket", "IPv4"),
    ({"bucket": "xn--bucket"}, "bucket", "starts with xn--"),
    ({"bucket": "sthree-bucket"}, "bucket", "starts with sthree-"),
    ({"bucket": "mine-s3alias"}, "bucket", "ends with -s3alias"),
    ({"bucket": "mine--ol-s3"}, "bucket", "ends with --ol-s3"),
    ({"bucket": "-mine"}, "bucket", "start and end with a lower-case letter or digit"),
    ({"prefix": "jobs"}, "prefix", "end it with /"),
    ({"prefix": "/jobs/"}, "prefix", "no leading slash"),
    ({"prefix": "a//b/"}, "prefix", "empty folder name"),
    ({"prefix": "a/" * 257}, "prefix", "longer than 512"),
    ({"tasks": {"source": "files"}}, "tasks.source", "set tasklist or inputs"),
    ({"tasks": {"pattern": "in*.dat"}}, "tasks.pattern", "only with tasks.source inputs"),
    ({"tasks": {"source": "inputs", "pattern": "a/*"}}, "tasks.pattern", "no folders"),
    ({"tasks": {"source": "inputs", "glob": "*"}}, "tasks.glob", "the fields of tasks are source, pattern"),
    ({"inputs": {"prefix": "in"}}, "inputs.prefix", "end it with /"),
    ({"shared": "kernel.dat"}, "shared", "not a list"),
    ({"shared": ["k.dat", "k.dat"]}, "shared[1]", "listed twice"),
    ({"shared": ["../k.dat"]}, "shared[0]", "path separator"),
    ({"shared": [f"k{i}" for i in range(33)]}, "shared", "more than 32"),
    ({"image": {}}, "image.name", "docker image reference"),
    ({"image": {"name": "Img:1"}}, "image.name", "docker image reference"),
    ({"image": {"name": "img:1", "source": "registry"}}, "image.name", "registry host"),
    ({"image": {"name": "img:1", "source": "s3"}}, "image.source", "baked, archive or registry"),
    ({"image": {"name": "img:1", "source": "archive"}}, "image.archive", "needs the key of the docker save archive"),
    ({"image": {"name": "img:1", "archive": "i.tar"}}, "image.archive", "only with image.source archive"),
    ({"image": {"name": "i:1", "source": "archive", "archive": "../i.tar"}}, "image.archive", "climb out"),
    ({"image": {"name": "i:1", "source": "archive", "archive": "/i.tar"}}, "image.archive", "no leading slash"),
    ({"image": {"name": "img:1", "digest": "sha256:ABC"}}, "image.digest", "64 lower-case hex"),
    ({"image": {"name": "img:1", "tag": "v1"}}, "image.tag", "the fields of image are name, source, archive, digest"),
    ({"command": []}, "command", "1 to 256"),
    ({"command": "run"}, "command", "not a list"),
    ({"command": ["run", 3]}, "command[1]", "quote it"),
    ({"command": ["a", "b", "c", "{foo}"]}, "command[3]", "{foo} is not a placeholder here: use {input}"),
    ({"command": ["a", "{task"]}, "command[1]", "write {{ for a literal brace"),
    ({"command": ["a}"]}, "command[0]", "write }} for a literal brace"),
    ({"command": ["{shared[k.dat]}"]}, "command[0]", "not listed in shared"),
    ({"env": {"FOO": "{bar}"}}, "env.FOO", "{bar} is not a placeholder"),
    ({"env": {"COUNT": 3}}, "env.COUNT", "quote it"),
    ({"env": {"FLAG": True}}, "env.FLAG", "quote it"),
    ({"env": {"1X": "a"}}, "env.1X", "not starting with a digit"),
    ({"env": {"AWS_ACCESS_KEY_ID": "x"}}, "env.AWS_ACCESS_KEY_ID", "instance profile"),
    ({"env": {"DB_Password": "x"}}, "env.DB_Password", "secrets store"),
    ({"env": {"GITHUB_TOKEN": "x"}}, "env.GITHUB_TOKEN", "instance profile"),
    ({"env": {"MY_API_KEY": "x"}}, "env.MY_API_KEY", "instance profile"),
    ({"env": {"KEY": "id=AKIAIOSFODNN7EXAMPLE"}}, "env.KEY", "AWS access key id"),
    ({"env": {"KEY": SECRET_KEY}}, "env.KEY", "secret key"),
    ({"cpus": 0}, "cpus", "above 0 and at most 128"),
    ({"cpus": 129}, "cpus", "above 0 and at most 128"),
    ({"cpus": True}, "cpus", "not a number"),
    ({"cpus": "2"}, "cpus", "not a number"),
    ({"memory_mib": 8}, "memory_mib", "from 16 to 4194304"),
    ({"memory_mib": 512.5}, "memory_mib", "not a whole number"),
    ({"timeout_seconds": 0}, "timeout_seconds", "from 1 to 604800"),
    ({"timeout_seconds": 604801}, "timeout_seconds", "from 1 to 604800"),
    (
        {"retry": {"attempts": 0}},
        "retry.attempts",
        "set a whole number from 1 to 10 (attempts in all before the task is recorded failed)",
    ),
    ({"retry": {"attempts": 11}}, "retry.attempts", "from 1 to 10"),
    ({"retry": {"attempts": False}}, "retry.attempts", "not a whole number"),
    (
        {"retry": {"evaluate_on_exit": [{"on_exit_code": "1", "action": "exit"}]}},
        "retry.evaluate_on_exit[0].action",
        "retry or fail",
    ),
    (
        {
            "retry": {
                "evaluate_on_exit": [{"on_exit_code": "1", "action": "fail"}, {"on_exit_code": "2", "action": "EXIT"}]
            }
        },
        "retry.evaluate_on_exit[1].action",
        "set retry or fail",
    ),
    (
        {"retry": {"evaluate_on_exit": [{"on_exit_code": "1?", "action": "fail"}]}},
        "retry.evaluate_on_exit[0].on_exit_code",
        "digits, optionally ending in *",
    ),
    (
        {"retry": {"evaluate_on_exit": [{"on_exit_code": "*1", "action": "fail"}]}},
        "retry.evaluate_on_exit[0].on_exit_code",
        "digits",
    ),
    ({"retry": {"evaluate_on_exit": [{"action": "fail"}]}}, "retry.evaluate_on_exit[0].on_exit_code", "is missing"),
    (
        {"retry": {"evaluate_on_exit": [{"on_exit_code": "1", "action": "fail", "reason": "x"}]}},
        "retry.evaluate_on_exit[0].reason",
        "on_exit_code, action",
    ),
    ({"retry": {"evaluate_on_exit": ["137"]}}, "retry.evaluate_on_exit[0]", "a mapping of on_exit_code and action"),
    ({"outputs": {"key": "{task}"}}, "outputs.key", "no {file}"),
    ({"outputs": {"key": "../{file}"}}, "outputs.key", "climb out"),
    ({"outputs": {"key": "/{file}"}}, "outputs.key", "no leading slash"),
    ({"outputs": {"key": "{task}//{file}"}}, "outputs.key", "empty folder name"),
    ({"outputs": {"key": "{output_name}/{file}"}}, "outputs.key", "use {task}, {stem} or {file}"),
    ({"outputs": {"prefix": "out"}}, "outputs.prefix", "end it with /"),
    ({"outputs": {"name": {"pattern": "in(", "replacement": "x"}}}, "outputs.name.pattern", "not a regular expression"),
    ({"outputs": {"name": {"pattern": "in(.+)", "replacement": r"out\2"}}}, "outputs.name.replacement", "which has 1"),
    ({"outputs": {"name": {"pattern": "in.+", "replacement": r"out\g<n>"}}}, "outputs.name.replacement", "which has 0"),
    (
        {"outputs": {"name": {"pattern": "in(.+)", "replacement": r"out\1", "otherwise": "x{input}"}}},
        "outputs.name.otherwise",
        "use {task} or {stem}",
    ),
    ({"outputs": {"name": {"replacement": "x"}}}, "outputs.name.pattern", "is missing"),
    ({"outputs": {"name": "out{task}"}}, "outputs.name", "not a mapping"),
    (
        {"dataset": {"inputs": 2, "input_size": 1, "kernel_size": 1, "done": 3, "seed": 0}},
        "dataset.done",
        "from 0 to dataset.inputs (2)",
    ),
    ({"dataset": {"inputs": 0, "input_size": 1, "kernel_size": 1, "done": 0, "seed": 0}}, "dataset.inputs", "from 1"),
    (
        {"dataset": {"inputs": 2, "input_size": "1", "kernel_size": 1, "done": 0, "seed": 0}},
        "dataset.input_size",
        "not a whole number",
    ),
    ({"dataset": {"inputs": 2, "input_size": 1, "kernel_size": 1, "done": 0}}, "dataset.seed", "is missing"),
    (
        {"dataset": {"inputs": 2, "input_size": 1, "kernel_size": 1, "done": 0, "seed": 0, "x": 1}},
        "dataset.x",
        "the fields of dataset are",
    ),
    ({"comand": ["run"]}, "comand", "did you mean command?"),
]


def _problem_at(found: list[str], path: str) -> str:
    """The one problem about ``path`` (a message starts with the field path and a space)."""
    matching = [problem for problem in found if problem.startswith(path + " ")]
    assert len(matching) == 1, f"expected one problem about {path}, got {found}"
    return matching[0]


@pytest.mark.parametrize(("change", "path", "advice"), BAD, ids=[f"{i}-{row[1]}" for i, row in enumerate(BAD)])
def test_bad_job(change, path, advice):
    data = _minimal(**copy.deepcopy(change))
    found = job.problems(data)
    assert advice in _problem_at(found, path), found
    with pytest.raises(job.JobError) as raised:
        job.load(data)
    assert raised.value.problems == found
    assert isinstance(raised.value, ValueError)
    assert str(raised.value) == "; ".join(found)


def test_message_names_path_value_and_advice():
    found = job.problems(_minimal(retry={"attempts": 0}))
    assert found == [
        "retry.attempts is 0: set a whole number from 1 to 10 (attempts in all before the task is recorded failed)"
    ]


def test_long_values_are_cut_to_80_characters():
    (problem,) = job.problems(_minimal(name="x" * 500))
    shown = problem.split(" is ", 1)[1].split(": ", 1)[0]
    assert len(shown) == 80 and shown.endswith("...")


def test_secrets_are_never_repeated():
    found = " ".join(
        job.problems(_minimal(env={"DB_PASSWORD": "hunter2", "K": SECRET_KEY, "A": "AKIAIOSFODNN7EXAMPLE"}))
    )
    for secret in ("hunter2", SECRET_KEY, "AKIAIOSFODNN7EXAMPLE"):
        assert secret not in found
    assert found.count("value not shown") == 3


@pytest.mark.parametrize(
    "value",
    ["/usr/share/cicc/input/files/run/a/b", "x" * 40, "0123456789012345678901234567890123456789", "{input}"],
)
def test_harmless_env_values_pass(value):
    assert job.problems(_minimal(env={"V": value})) == []


def test_several_problems_at_once():
    data = _minimal(
        name="Bad Name",
        bucket="xn--b",
        cpus=0,
        retry={"attempts": 0, "evaluate_on_exit": [{"on_exit_code": "1", "action": "exit"}]},
        command=["{nope}"],
        colour="blue",
    )
    del data["image"]
    found = job.problems(data)
    paths = ["name", "bucket", "cpus", "retry.attempts", "retry.evaluate_on_exit[0].action", "command[0]", "colour"]
    for path in paths + ["image.name"]:
        _problem_at(found, path)
    assert len(found) == len(paths) + 1
    with pytest.raises(job.JobError) as raised:
        job.load(data)
    assert len(raised.value.problems) == len(found)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ([1, 2], "the job is a list, not a mapping of fields"),
        ("xor", "the job is a string, not a mapping of fields"),
        (None, "the job is null, not a mapping of fields"),
        ({"cicc_job": {"name": "x"}}, "pass the value of its cicc_job key"),
    ],
)
def test_not_a_job(data, fragment):
    found = job.problems(data)
    assert len(found) == 1 and fragment in found[0]


def test_required_fields_missing():
    found = job.problems({})
    for path in ("name", "bucket", "image.name", "command"):
        assert f"{path} is missing: set" in _problem_at(found, path)
    assert len(found) == 4


def test_empty_groups_and_null_defaults_are_accepted():
    loaded = job.load(_minimal(tasks=None, retry={}, outputs={"prefix": None, "name": None}, dataset=None))
    assert loaded == job.load(_minimal())


def test_default_values_may_be_given_explicitly():
    # as_dict writes every field, so the defaults must be accepted where the non-defaults are refused
    assert (
        job.problems(_minimal(tasks={"source": "tasklist", "pattern": "*"}, image={"name": "i:1", "archive": ""})) == []
    )


def test_registry_image_and_digest():
    name = "123456789012.dkr.ecr.us-east-1.amazonaws.com/repo:tag"
    digest = "sha256:" + "0a" * 32
    loaded = job.load(_minimal(image={"name": name, "source": "registry", "digest": digest}))
    assert (loaded.image_name, loaded.image_digest) == (name, digest)


# --- the reference and the filter ------------------------------------------------------------------


def test_docs_job_md_is_current():
    assert (ROOT / "docs" / "job.md").read_text(
        encoding="utf-8"
    ) == job.reference(), "docs/job.md is stale: run python scripts/job-reference.py"


def test_reference_script_check():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "job-reference.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_reference_lists_every_field():
    text = job.reference()
    for path in ("name", "tasks.pattern", "retry.evaluate_on_exit[].action", "outputs.name.otherwise", "dataset.seed"):
        assert f"| `{path}` |" in text
    assert "`{shared[NAME]}`" in text


def test_filter_plugin():
    filters = job_filter.FilterModule().filters()
    assert filters["job_problems"](_example("xor.yml")) == []
    assert filters["job_problems"](_minimal(retry={"attempts": 0}))[0].startswith("retry.attempts is 0:")


def test_selects_inputs_by_pattern(summary):
    assert summary.selects("in3.dat") and not summary.selects("out3.dat") and not summary.selects("In3.dat")
    shared = job.load(_minimal(tasks={"source": "inputs"}, shared=["kernel.dat"]))
    assert shared.selects("in3.dat") and not shared.selects("kernel.dat")  # a shared file is never a task
