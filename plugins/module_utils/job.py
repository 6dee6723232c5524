# -*- coding: utf-8 -*-
# Copyright: cicc.cloud contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The job file of cicc.cloud: any container over any inputs in S3, described by the user.

A job file is YAML with one top-level key ``cicc_job`` (so ``-e @jobs/xor.yml`` works); this module
receives its value, already parsed. ``problems(data)`` lists everything wrong with it at once, each
message naming the field, the value given and what would be right; ``load(data)`` returns the
validated, normalised ``Job`` (or raises ``JobError`` with all the problems).

The fields are ONE table, ``_SCHEMA``: the same rows drive the validation and ``reference()``, the
Markdown reference in docs/job.md (``scripts/job-reference.py`` rewrites it), so the two cannot
drift apart.

Placeholders in ``command`` and ``env`` values (``{input}``, ``{task}``, ``{shared[NAME]}``...) are
expanded by a small tokenizer, never ``str.format``: a job file must not be able to reach
attributes or items of Python objects.

Standard library only (and task_queue's task-name rule): the modules, the filter plugin, the worker
and the tests import it.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

try:
    from ansible_collections.cicc.cloud.plugins.module_utils import task_queue
except ImportError:  # on an instance the worker runs beside a plain copy of task_queue.py
    import task_queue  # type: ignore[no-redef]

JOB_FILE = "job.json"
CONTAINER_INPUT_DIR = "/cicc/input"
CONTAINER_SHARED_DIR = "/cicc/shared"
CONTAINER_OUTPUT_DIR = "/cicc/output"

MAX_SHOWN = 80
MAX_SHARED = 32
MAX_PREFIX = 512
MAX_IMAGE_NAME = 255
MAX_COMMAND_ITEMS = 256
MAX_COMMAND_ITEM = 4096


class JobError(ValueError):
    """A job that cannot run as written; ``problems`` lists every reason, each one a sentence to act on."""

    def __init__(self, problems) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


# --- values shown in messages ------------------------------------------------------------------------


def _show(value) -> str:
    """The value as given, cut short: enough to find it in the file, never a wall of text."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "a whole number"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"


class _Problems:
    """Collects the messages: validation never stops at the first one."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, value, advice: str) -> None:
        self.items.append(f"{path} is {_show(value)}: {advice}")

    def note(self, path: str, text: str) -> None:
        """A problem whose value must not be repeated (a secret) or is not a single value."""
        self.items.append(f"{path} {text}")


_INVALID = object()  # a field that failed its own check: the checks across fields skip it
_REQUIRED = object()  # the default of a field that must be given


# --- placeholders ----------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_SHARED_REF_RE = re.compile(r"shared\[([^\[\]]*)\]")

# name -> what it becomes in the container; the command/env placeholders, in the order of the docs
_PLACEHOLDERS = (
    ("input", f"{CONTAINER_INPUT_DIR}/<task>: the task's input file"),
    ("input_dir", f"{CONTAINER_INPUT_DIR}: the folder holding the task's input"),
    ("task", "the task name, e.g. in3.dat"),
    ("stem", "the task name without its last suffix: in3.dat -> in3, a.b.c -> a.b, noext -> noext"),
    ("output_dir", f"{CONTAINER_OUTPUT_DIR}: where the container writes the files to publish"),
    ("output_name", "outputs.name applied to the task (the task name itself when outputs.name is null)"),
    ("shared_dir", f"{CONTAINER_SHARED_DIR}: the folder of the shared files, read-only"),
    ("shared[NAME]", f"{CONTAINER_SHARED_DIR}/NAME, where NAME must be listed in shared"),
)
_KEY_PLACEHOLDERS = (
    ("task", "the task name"),
    ("stem", "the task name without its last suffix"),
    ("file", "the published file's name, relative to the container's output folder"),
)
_OTHERWISE_PLACEHOLDERS = (("task", "the task name"), ("stem", "the task name without its last suffix"))


class _PlaceholderError(ValueError):
    pass


def _braced(names) -> str:
    shown = [f"{{{name}}}" for name, dummy in names]
    return ", ".join(shown[:-1]) + " or " + shown[-1] if len(shown) > 1 else shown[0]


def _expand(text: str, lookup, valid) -> str:
    """``text`` with each ``{name}`` replaced by ``lookup(name)`` (None: not a placeholder here);
    ``{{`` and ``}}`` are literal braces. ``valid`` lists the placeholders for the message."""
    parts: list[str] = []
    position = 0
    for match in _TOKEN_RE.finditer(text):
        parts.append(text[position : match.start()])
        position = match.end()
        token = match.group(0)
        if token in ("{{", "}}"):
            parts.append(token[0])
        elif match.group(1) is None:
            raise _PlaceholderError(
                f"a single {token!r} at character {match.start()}: write {token * 2} for a literal brace, "
                f"or use one of the placeholders {_braced(valid)}"
            )
        else:
            value = lookup(match.group(1))
            if value is None:
                raise _PlaceholderError(
                    f"{token} is not a placeholder here: use {_braced(valid)} ({{{{ and }}}} are literal braces)"
                )
            parts.append(value)
    parts.append(text[position:])
    return "".join(parts)


def _placeholders(text: str) -> list[str]:
    """The names of the placeholders in ``text`` (assumed valid)."""
    return [m.group(1) for m in _TOKEN_RE.finditer(text) if m.group(1) is not None]


def stem(task: str) -> str:
    """The task name without its last suffix: in3.dat -> in3, a.b.c -> a.b, noext -> noext."""
    head, dot, dummy = task.rpartition(".")
    return head if dot and head else task


def _container_lookup(shared, task: str = "", output_name: str = ""):
    """The command/env placeholders' values; with no task, any value (validation only)."""
    values = {
        "input": f"{CONTAINER_INPUT_DIR}/{task}",
        "input_dir": CONTAINER_INPUT_DIR,
        "task": task,
        "stem": stem(task) if task else "",
        "output_dir": CONTAINER_OUTPUT_DIR,
        "output_name": output_name,
        "shared_dir": CONTAINER_SHARED_DIR,
    }

    def lookup(name: str):
        if name in values:
            return values[name]
        ref = _SHARED_REF_RE.fullmatch(name)
        if ref is None:
            return None
        if ref.group(1) not in shared:
            listed = ", ".join(shared) if shared else "none"
            raise _PlaceholderError(
                f"{{{name}}} names {ref.group(1)!r}, which is not listed in shared (listed: {listed}): "
                "add it to shared, or use one of the listed names"
            )
        return f"{CONTAINER_SHARED_DIR}/{ref.group(1)}"

    return lookup


def _simple_lookup(values: dict):
    return values.get


# --- checks of single values -----------------------------------------------------------------------


def _prefix_problem(value: str) -> str | None:
    if value == "":
        return None
    if len(value) > MAX_PREFIX:
        return f"longer than {MAX_PREFIX} characters"
    if value.startswith("/"):
        return "starts with /: S3 keys have no leading slash"
    if not value.endswith("/"):
        return 'does not end with /: a prefix is a folder, so end it with / (or use "" for the bucket\'s top)'
    if "//" in value:
        return "contains //: an empty folder name"
    return None


def _relative_key_problem(value: str) -> str | None:
    if value.startswith("/"):
        return "starts with /: give the key relative to the prefix, with no leading slash"
    if "//" in value:
        return "contains //: an empty folder name"
    if ".." in value.split("/"):
        return "has a .. segment: a key may not climb out of its prefix"
    if value.endswith("/"):
        return "ends with /: that is a folder, not an object"
    return None


_BUCKET_CHARS_RE = re.compile(r"[a-z0-9.-]*")
_IPV4_RE = re.compile(r"\d{1,3}(\.\d{1,3}){3}")


def _bucket_problem(value: str) -> str | None:
    if not 3 <= len(value) <= 63:
        return f"{len(value)} characters long: S3 bucket names have 3 to 63"
    if not _BUCKET_CHARS_RE.fullmatch(value):
        return "has characters S3 does not allow: use lower-case letters, digits, . and - only"
    if not (value[0].isalnum() and value[-1].isalnum()):
        return "must start and end with a lower-case letter or digit"
    if ".." in value:
        return "contains ..: two dots in a row are not allowed in a bucket name"
    if _IPV4_RE.fullmatch(value):
        return "is shaped like an IPv4 address, which S3 refuses as a bucket name"
    for start in ("xn--", "sthree-"):
        if value.startswith(start):
            return f"starts with {start}, which S3 reserves"
    for end in ("-s3alias", "--ol-s3"):
        if value.endswith(end):
            return f"ends with {end}, which S3 reserves for access point aliases"
    return None


_SECRET_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_SECRET_WORDS = ("SECRET", "PASSWORD", "PASSWD", "TOKEN", "CREDENTIAL", "PRIVATE_KEY", "API_KEY")
_ACCESS_KEY_RE = re.compile(r"(AKIA|ASIA)[A-Z0-9]{16}")
_SECRET_KEY_RE = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])")
_SECRET_ADVICE = (
    "the job is stored in the bucket as job.json and shown in logs, so it must hold no credential: "
    "give the instance profile the access the container needs, or have the container fetch the secret "
    "from a secrets store (AWS Secrets Manager, SSM Parameter Store) at run time"
)


def _secret_value(value: str) -> str | None:
    if _ACCESS_KEY_RE.search(value):
        return "an AWS access key id"
    for match in _SECRET_KEY_RE.finditer(value):
        run = match.group(0)
        if "/" in run or "+" in run or (any(c.isdigit() for c in run) and any(c.isupper() for c in run)):
            return "a secret key (40 characters of A-Z a-z 0-9 / + =)"
    return None


# --- the schema ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Field:
    """One row of the schema: validation and the reference both read it.

    ``rule`` says what a right value is; a message about a bad value reads ``set <rule> (<about>)``.
    ``check(value, path, out, field)`` returns the normalised value, or _INVALID after ``out.add``.
    ``children`` make a mapping, ``items`` a list of mappings; ``nullable`` fields take null as a value.
    """

    key: str
    type: str
    default: object
    rule: str
    about: str
    check: object = None
    children: tuple = ()
    items: tuple = ()
    nullable: bool = False

    def advice(self) -> str:
        return f"set {self.rule} ({self.about})"


def _bad(out: _Problems, path: str, value, field: _Field, detail: str | None = None):
    out.add(path, value, f"{detail}; {field.advice()}" if detail else field.advice())
    return _INVALID


def _text(pattern: str | None = None, max_len: int | None = None, problem=None, empty: bool = True):
    compiled = re.compile(pattern) if pattern else None

    def check(value, path, out, field):
        if not isinstance(value, str):
            return _bad(out, path, value, field, f"{_kind(value)}, not a string")
        if not value and not empty:
            return _bad(out, path, value, field)
        if max_len is not None and len(value) > max_len:
            return _bad(out, path, value, field, f"longer than {max_len} characters")
        if compiled is not None and not compiled.fullmatch(value):
            return _bad(out, path, value, field)
        detail = problem(value) if problem else None
        if detail:
            return _bad(out, path, value, field, detail)
        return str(value)

    return check


def _choice(*choices: str):
    def check(value, path, out, field):
        if value not in choices or not isinstance(value, str):
            return _bad(out, path, value, field)
        return str(value)

    return check


def _whole(low: int, high: int | None = None):
    def check(value, path, out, field):
        if isinstance(value, bool) or not isinstance(value, int):
            return _bad(out, path, value, field, f"{_kind(value)}, not a whole number" if value is not None else None)
        if value < low or (high is not None and value > high):
            return _bad(out, path, value, field)
        return int(value)

    return check


def _cpus(value, path, out, field):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _bad(out, path, value, field, f"{_kind(value)}, not a number")
    if not 0 < value <= 128:
        return _bad(out, path, value, field)
    return float(value)


def _shared(value, path, out, field):
    if not isinstance(value, list):
        return _bad(out, path, value, field, f"{_kind(value)}, not a list")
    if len(value) > MAX_SHARED:
        return _bad(out, path, value, field, f"{len(value)} names, more than {MAX_SHARED}")
    names: list[str] = []
    ok = True
    for index, name in enumerate(value):
        item = f"{path}[{index}]"
        if not isinstance(name, str):
            out.add(item, name, f"{_kind(name)}: set a file name (an object directly under inputs.prefix)")
            ok = False
            continue
        problem = task_queue.name_problem(name)
        if problem:
            out.add(item, name, f"{problem}: set a plain object name directly under inputs.prefix, e.g. kernel.dat")
            ok = False
        elif name in names:
            out.add(item, name, f"listed twice (also {path}[{names.index(name)}]): list each shared file once")
            ok = False
        names.append(name)
    return tuple(names) if ok else _INVALID


def _command(value, path, out, field):
    if not isinstance(value, list):
        return _bad(out, path, value, field, f"{_kind(value)}, not a list")
    if not 1 <= len(value) <= MAX_COMMAND_ITEMS:
        return _bad(out, path, value, field, f"{len(value)} items")
    ok = True
    for index, arg in enumerate(value):
        item = f"{path}[{index}]"
        if not isinstance(arg, str):
            out.add(item, arg, f'{_kind(arg)}: every argument is a string; quote it in the YAML ("{arg}")')
            ok = False
        elif len(arg) > MAX_COMMAND_ITEM:
            out.add(item, arg, f"longer than {MAX_COMMAND_ITEM} characters: pass long data in a shared file")
            ok = False
    return tuple(value) if ok else _INVALID


_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _env(value, path, out, field):
    if not isinstance(value, dict):
        return _bad(out, path, value, field, f"{_kind(value)}, not a mapping")
    ok = True
    for name, text in value.items():
        item = f"{path}.{name}"
        if not isinstance(name, str) or not _ENV_NAME_RE.fullmatch(name):
            out.note(
                item, f"has the name {_show(name)}: a variable name is letters, digits and _, not starting with a digit"
            )
            ok = False
            continue
        upper = name.upper()
        if upper in _SECRET_NAMES or any(word in upper for word in _SECRET_WORDS):
            out.note(item, f"is set (value not shown): a credential does not belong in a job; {_SECRET_ADVICE}")
            ok = False
            continue
        if not isinstance(text, str):
            out.add(item, text, f'{_kind(text)}: environment values are strings; quote it in the YAML ("{text}")')
            ok = False
            continue
        secret = _secret_value(text)
        if secret:
            out.note(item, f"holds what looks like {secret} (value not shown); {_SECRET_ADVICE}")
            ok = False
    return tuple(sorted(value.items())) if ok else _INVALID


_EXIT_CODE_RE = re.compile(r"[0-9]*\*?")


def _exit_code(value, path, out, field):
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    if not isinstance(value, str) or not value or not _EXIT_CODE_RE.fullmatch(value):
        return _bad(out, path, value, field)
    return str(value)


def _pattern(value, path, out, field):
    checked = _text(empty=False)(value, path, out, field)
    if checked is _INVALID:
        return checked
    try:
        re.compile(checked)
    except re.error as exc:
        return _bad(out, path, value, field, f"not a regular expression ({exc})")
    return checked


def _template(names, required: tuple = (), sample: dict | None = None, problem=None):
    """A string with the placeholders ``names``; ``required`` must appear; ``problem`` judges the
    expansion with ``sample`` values (e.g. a key that climbs out of its prefix)."""
    valid = tuple(names)
    allowed = {name: "x" for name, dummy in valid}

    def check(value, path, out, field):
        checked = _text(empty=False)(value, path, out, field)
        if checked is _INVALID:
            return checked
        try:
            expanded = _expand(checked, _simple_lookup(sample or allowed), valid)
        except _PlaceholderError as exc:
            return _bad(out, path, value, field, str(exc))
        for name in required:
            if name not in _placeholders(checked):
                return _bad(out, path, value, field, f"no {{{name}}}")
        detail = problem(expanded) if problem else None
        if detail:
            return _bad(out, path, value, field, detail)
        return checked

    return check


_PREFIX_RULE = '"" or a folder: ending with /, not starting with /, no //, at most 512 characters'
_NAME_RULE = "a plain object name: letters, digits and . _ + -, starting with a letter or digit"

_SCHEMA = (
    _Field(
        "name",
        "string",
        _REQUIRED,
        "1 to 32 of a-z 0-9 -, starting with a letter or digit",
        "the job's name: it names its tags and IAM roles",
        _text(r"[a-z0-9][a-z0-9-]{0,31}"),
    ),
    _Field(
        "bucket",
        "string",
        _REQUIRED,
        "an S3 bucket name: 3 to 63 of a-z 0-9 . -, starting and ending with a letter or digit, no .., "
        "not an IPv4 address, not starting xn-- or sthree-, not ending -s3alias or --ol-s3",
        "the bucket holding the inputs, the queue and the outputs",
        _text(problem=_bucket_problem),
    ),
    _Field(
        "prefix",
        "string",
        "",
        _PREFIX_RULE,
        "the job's folder in the bucket: the queue lives here (tasklist.txt, completed.txt, locks/, "
        "manifests/, failed/, job.json)",
        _text(problem=_prefix_problem),
    ),
    _Field(
        "tasks",
        "mapping",
        {},
        "a mapping of source and pattern",
        "where the task names come from",
        children=(
            _Field(
                "source",
                "string",
                "tasklist",
                "tasklist or inputs",
                "tasklist: the names in the queue's tasklist.txt; inputs: the objects directly under inputs.prefix "
                "whose name matches tasks.pattern",
                _choice("tasklist", "inputs"),
            ),
            _Field(
                "pattern",
                "string",
                "*",
                "an fnmatch pattern of task names (case-sensitive, no /), e.g. in*.dat",
                "which objects under inputs.prefix are tasks; only with tasks.source inputs",
                _text(problem=lambda v: "contains /: task names have no folders" if "/" in v else None, empty=False),
            ),
        ),
    ),
    _Field(
        "inputs",
        "mapping",
        {},
        "a mapping of prefix",
        "where the inputs are",
        children=(
            _Field(
                "prefix",
                "string or null",
                None,
                _PREFIX_RULE + ", or null for the job's prefix",
                "a task's input is the object inputs.prefix + task name; null means the job's prefix",
                _text(problem=_prefix_problem),
                nullable=True,
            ),
        ),
    ),
    _Field(
        "shared",
        "list of strings",
        [],
        f"a list of at most {MAX_SHARED} different names, each {_NAME_RULE}",
        "files every task gets read-only: the objects inputs.prefix + name, in {shared_dir}",
        _shared,
    ),
    _Field(
        "image",
        "mapping",
        {},
        "a mapping of name, source, archive and digest",
        "the container image",
        children=(
            _Field(
                "name",
                "string",
                _REQUIRED,
                f"a docker image reference: a-z 0-9 first, then letters, digits and . _ / : @ -, at most "
                f"{MAX_IMAGE_NAME} characters; with source registry it starts with a registry host containing a "
                "dot, e.g. 123456789012.dkr.ecr.us-east-1.amazonaws.com/repo:tag",
                "the image the container runs",
                _text(r"[a-z0-9][A-Za-z0-9._/:@-]*", MAX_IMAGE_NAME),
            ),
            _Field(
                "source",
                "string",
                "baked",
                "baked, archive or registry",
                "baked: in the AMI at configure time; archive: a docker save archive in the bucket, loaded at boot; "
                "registry: pulled at boot",
                _choice("baked", "archive", "registry"),
            ),
            _Field(
                "archive",
                "string",
                "",
                "a key relative to the job's prefix (no leading /, no .. segment, no //, not ending with /), "
                'required with source archive and "" otherwise',
                "the docker save archive of the image",
                _text(problem=lambda v: _relative_key_problem(v) if v else None),
            ),
            _Field(
                "digest",
                "string",
                "",
                '"" or sha256: and 64 lower-case hex digits',
                "the image ID the loaded or pulled image must have (docker inspect -f '{{.Id}}'); checked when given",
                _text(r"(sha256:[0-9a-f]{64})?"),
            ),
        ),
    ),
    _Field(
        "command",
        "list of strings",
        _REQUIRED,
        f"a list of 1 to {MAX_COMMAND_ITEMS} strings of at most {MAX_COMMAND_ITEM} characters, with placeholders",
        "the container's arguments, after its entrypoint",
        _command,
    ),
    _Field(
        "env",
        "mapping of strings",
        {},
        "a mapping of variable names (letters, digits and _, not starting with a digit) to strings (quote numbers "
        "and booleans), with placeholders; no credentials: names such as AWS_ACCESS_KEY_ID or containing SECRET, "
        "PASSWORD, PASSWD, TOKEN, CREDENTIAL, PRIVATE_KEY or API_KEY, and values shaped like AWS keys, are refused",
        "the container's environment; credentials come from the instance profile or a secrets store at run time",
        _env,
    ),
    _Field(
        "cpus",
        "number",
        1,
        "a number above 0 and at most 128",
        "the CPUs the container may use",
        _cpus,
    ),
    _Field(
        "memory_mib",
        "whole number",
        512,
        "a whole number from 16 to 4194304",
        "the container's memory limit in MiB",
        _whole(16, 4194304),
    ),
    _Field(
        "timeout_seconds",
        "whole number",
        900,
        "a whole number from 1 to 604800",
        "how long one run of the container may take before it is killed",
        _whole(1, 604800),
    ),
    _Field(
        "retry",
        "mapping",
        {},
        "a mapping of attempts and evaluate_on_exit",
        "what happens when the container fails",
        children=(
            _Field(
                "attempts",
                "whole number",
                3,
                "a whole number from 1 to 10",
                "attempts in all before the task is recorded failed",
                _whole(1, 10),
            ),
            _Field(
                "evaluate_on_exit",
                "list of mappings",
                [],
                "a list of mappings of on_exit_code and action",
                "as AWS Batch's evaluateOnExit: the first rule whose on_exit_code matches decides; a non-zero exit "
                "code no rule matches is retried",
                items=(
                    _Field(
                        "on_exit_code",
                        "string",
                        _REQUIRED,
                        'digits, optionally ending in *, or * alone (e.g. "137", "1*", "*"); a whole number is '
                        "taken as its string",
                        'the exit codes the rule matches: "1*" matches 1, 10-19, 100-199...; "*" matches every code',
                        _exit_code,
                    ),
                    _Field(
                        "action",
                        "string",
                        _REQUIRED,
                        "retry or fail",
                        "retry: try again while attempts remain; fail: record the task failed at once",
                        _choice("retry", "fail"),
                    ),
                ),
            ),
        ),
    ),
    _Field(
        "outputs",
        "mapping",
        {},
        "a mapping of prefix, key and name",
        "where and under which names the outputs are published",
        children=(
            _Field(
                "prefix",
                "string or null",
                None,
                _PREFIX_RULE + ", or null for the job's prefix",
                "where the outputs are published; null means the job's prefix",
                _text(problem=_prefix_problem),
                nullable=True,
            ),
            _Field(
                "key",
                "string",
                "{task}/{file}",
                "a key template with {file} and optionally {task} and {stem}; expanded, it must not start with / "
                "or contain // or a .. segment",
                "the key of each published file, relative to outputs.prefix",
                _template(
                    _KEY_PLACEHOLDERS,
                    required=("file",),
                    sample={"task": "t", "stem": "t", "file": "f"},
                    problem=_relative_key_problem,
                ),
            ),
            _Field(
                "name",
                "mapping or null",
                None,
                "a mapping of pattern, replacement and otherwise, or null",
                "the {output_name} placeholder: re.fullmatch(pattern, task) then match.expand(replacement); a task "
                "the pattern does not match gets otherwise; null: output_name is the task name",
                nullable=True,
                children=(
                    _Field(
                        "pattern",
                        "string",
                        _REQUIRED,
                        "a Python regular expression, e.g. '^in(.+)$'",
                        "matched against the whole task name",
                        _pattern,
                    ),
                    _Field(
                        "replacement",
                        "string",
                        _REQUIRED,
                        "a re replacement referring only to groups the pattern has, e.g. 'out\\1'",
                        "the output name of a task the pattern matches",
                        _text(),
                    ),
                    _Field(
                        "otherwise",
                        "string",
                        "{task}",
                        "a non-empty string with the placeholders {task} and {stem}, e.g. 'out_{task}'",
                        "the output name of a task the pattern does not match",
                        _template(_OTHERWISE_PLACEHOLDERS),
                    ),
                ),
            ),
        ),
    ),
    _Field(
        "dataset",
        "mapping or null",
        None,
        "a mapping of inputs, input_size, kernel_size, done and seed, or null",
        "the XOR demo's data set, written by the bucket step only when present",
        nullable=True,
        children=(
            _Field("inputs", "whole number", _REQUIRED, "a whole number from 1", "how many inputs", _whole(1)),
            _Field("input_size", "whole number", _REQUIRED, "a whole number from 1", "bytes per input", _whole(1)),
            _Field("kernel_size", "whole number", _REQUIRED, "a whole number from 1", "bytes of the kernel", _whole(1)),
            _Field(
                "done",
                "whole number",
                _REQUIRED,
                "a whole number from 0 to dataset.inputs",
                "how many inputs start out processed",
                _whole(0),
            ),
            _Field("seed", "whole number", _REQUIRED, "a whole number from 0", "the random seed", _whole(0)),
        ),
    ),
)


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _copy(value):
    return list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value


def _mapping(fields: tuple, data: dict, path: str, out: _Problems) -> dict:
    """The fields of one mapping, normalised, each missing one at its default; every unknown key,
    and every bad value, is a problem."""
    known = [f.key for f in fields]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.7)
            hint = f"did you mean {close[0]}? " if close else ""
            where = f"the fields of {path}" if path else "the job's fields"
            out.add(_join(path, key), data[key], f"not a known field: {hint}{where} are {', '.join(known)}")
    result: dict = {}
    for field in fields:
        where = _join(path, field.key)
        if field.key not in data:
            if field.default is _REQUIRED:
                out.note(where, f"is missing: {field.advice()}")
                result[field.key] = _INVALID
            elif field.children and field.default is not None:
                result[field.key] = _mapping(field.children, {}, where, out)
            else:
                result[field.key] = _copy(field.default)
            continue
        value = data[field.key]
        if value is None and field.nullable:
            result[field.key] = None
        elif field.children:
            if value is None:
                value = {}
            if isinstance(value, dict):
                result[field.key] = _mapping(field.children, value, where, out)
            else:
                result[field.key] = _bad(out, where, value, field, f"{_kind(value)}, not a mapping")
        elif field.items:
            if not isinstance(value, list):
                result[field.key] = _bad(out, where, value, field, f"{_kind(value)}, not a list")
                continue
            items = []
            for index, item in enumerate(value):
                item_path = f"{where}[{index}]"
                if isinstance(item, dict):
                    items.append(_mapping(field.items, item, item_path, out))
                else:
                    names = " and ".join(f.key for f in field.items)
                    out.add(item_path, item, f"{_kind(item)}: set a mapping of {names}")
                    items.append(_INVALID)
            result[field.key] = items
        else:
            result[field.key] = field.check(value, where, out, field)
    return result


def _valid(*values) -> bool:
    return all(value is not _INVALID for value in values)


def _across(norm: dict, out: _Problems) -> None:
    """The rules between fields, each checked only when the fields it reads are valid on their own."""
    tasks, image, outputs, dataset = norm["tasks"], norm["image"], norm["outputs"], norm["dataset"]
    if _valid(tasks) and tasks["source"] == "tasklist" and tasks["pattern"] not in (_INVALID, "*"):
        out.add(
            "tasks.pattern",
            tasks["pattern"],
            "a pattern applies only with tasks.source inputs: remove it, or set tasks.source: inputs",
        )
    if _valid(image):
        source, archive, name = image["source"], image["archive"], image["name"]
        if source == "archive" and archive == "":
            out.note(
                "image.archive",
                "is missing: image.source archive needs the key of the docker save archive, relative to the "
                "job's prefix, e.g. images/my-image.tar",
            )
        elif _valid(source, archive) and source != "archive" and archive != "":
            out.add(
                "image.archive",
                archive,
                f"an archive applies only with image.source archive (it is {source}): remove it",
            )
        if source == "registry" and _valid(name):
            host = name.split("/", 1)[0] if "/" in name else ""
            if "." not in host:
                out.add(
                    "image.name",
                    name,
                    "with image.source registry, start with the registry host (it contains a dot), e.g. "
                    "123456789012.dkr.ecr.us-east-1.amazonaws.com/repo:tag",
                )
    shared = norm["shared"] if _valid(norm["shared"]) else None
    if shared is not None:
        lookup = _container_lookup(shared, "t", "t")
        command = norm["command"]
        if _valid(command):
            for index, arg in enumerate(command):
                _check_placeholders(f"command[{index}]", arg, lookup, out)
        if _valid(norm["env"]):
            for name, value in norm["env"]:
                _check_placeholders(f"env.{name}", value, lookup, out)
    rule = outputs["name"] if _valid(outputs) else _INVALID
    if rule not in (None, _INVALID) and _valid(rule["pattern"], rule["replacement"]):
        compiled = re.compile(rule["pattern"])
        # A match of the same groups, each empty: expanding on it finds any reference to a missing group.
        names = {index: name for name, index in compiled.groupindex.items()}
        trial = "".join(f"(?P<{names[i]}>)" if i in names else "()" for i in range(1, compiled.groups + 1))
        try:
            re.fullmatch(trial, "").expand(rule["replacement"])
        except (re.error, IndexError) as exc:
            out.add(
                "outputs.name.replacement",
                rule["replacement"],
                f"{exc}: refer only to the groups of outputs.name.pattern, which has {compiled.groups} "
                "(\\1, \\g<1> or \\g<name>)",
            )
    if dataset not in (None, _INVALID) and _valid(dataset["inputs"], dataset["done"]):
        if dataset["done"] > dataset["inputs"]:
            out.add(
                "dataset.done", dataset["done"], f"set a whole number from 0 to dataset.inputs ({dataset['inputs']})"
            )


def _check_placeholders(path: str, text: str, lookup, out: _Problems) -> None:
    try:
        _expand(text, lookup, _PLACEHOLDERS)
    except _PlaceholderError as exc:
        out.add(path, text, str(exc))


def _validate(data) -> tuple[list[str], dict | None]:
    out = _Problems()
    if not isinstance(data, dict):
        out.items.append(
            f"the job is {_kind(data)}, not a mapping of fields: give cicc_job a mapping with at least name, "
            f"bucket, image.name and command (given {_show(data)})"
        )
        return out.items, None
    if list(data) == ["cicc_job"]:
        out.items.append(
            "the job is the whole job file: pass the value of its cicc_job key, the mapping of name, bucket, image, "
            "command..."
        )
        return out.items, None
    norm = _mapping(_SCHEMA, data, "", out)
    _across(norm, out)
    return out.items, norm


def problems(data) -> list[str]:
    """Everything wrong with the job ``data`` (the value of cicc_job), all at once; [] when it can run."""
    return _validate(data)[0]


def load(data) -> Job:
    """The validated job, normalised (every default filled in, prefixes resolved); JobError otherwise."""
    found, norm = _validate(data)
    if found:
        raise JobError(found)
    prefix = norm["prefix"]
    inputs_prefix = norm["inputs"]["prefix"]
    output_prefix = norm["outputs"]["prefix"]
    rule = norm["outputs"]["name"]
    dataset = norm["dataset"]
    return Job(
        name=norm["name"],
        bucket=norm["bucket"],
        prefix=prefix,
        tasks_source=norm["tasks"]["source"],
        tasks_pattern=norm["tasks"]["pattern"],
        input_prefix=prefix if inputs_prefix is None else inputs_prefix,
        shared=tuple(norm["shared"]),
        image_name=norm["image"]["name"],
        image_source=norm["image"]["source"],
        image_archive=norm["image"]["archive"],
        image_digest=norm["image"]["digest"],
        command=tuple(norm["command"]),
        env=tuple(norm["env"]),
        cpus=float(norm["cpus"]),
        memory_mib=norm["memory_mib"],
        timeout_seconds=norm["timeout_seconds"],
        attempts=norm["retry"]["attempts"],
        evaluate_on_exit=tuple((r["on_exit_code"], r["action"]) for r in norm["retry"]["evaluate_on_exit"]),
        output_prefix=prefix if output_prefix is None else output_prefix,
        output_key_template=norm["outputs"]["key"],
        output_name_rule=None if rule is None else (rule["pattern"], rule["replacement"], rule["otherwise"]),
        dataset=None if dataset is None else tuple((f.key, dataset[f.key]) for f in _DATASET_FIELDS),
    )


_DATASET_FIELDS = next(f for f in _SCHEMA if f.key == "dataset").children


def _task(task: str) -> str:
    problem = task_queue.name_problem(task) if isinstance(task, str) else "not a string"
    if problem:
        raise JobError([f"task {_show(task)} cannot be a task name: {problem}"])
    return task


@dataclass(frozen=True)
class Job:
    """A validated job (build it with ``load``): where its data is and how each task runs."""

    name: str
    bucket: str
    prefix: str
    tasks_source: str
    tasks_pattern: str
    input_prefix: str
    shared: tuple
    image_name: str
    image_source: str
    image_archive: str
    image_digest: str
    command: tuple
    env: tuple
    cpus: float
    memory_mib: int
    timeout_seconds: int
    attempts: int
    evaluate_on_exit: tuple
    output_prefix: str
    output_key_template: str
    output_name_rule: tuple | None
    dataset: tuple | None

    def as_dict(self) -> dict:
        """The job as a job file's cicc_job, every field explicit and both prefixes resolved:
        what is stored as job.json, and ``load(job.as_dict()) == job``."""
        rule = self.output_name_rule
        return {
            "name": self.name,
            "bucket": self.bucket,
            "prefix": self.prefix,
            "tasks": {"source": self.tasks_source, "pattern": self.tasks_pattern},
            "inputs": {"prefix": self.input_prefix},
            "shared": list(self.shared),
            "image": {
                "name": self.image_name,
                "source": self.image_source,
                "archive": self.image_archive,
                "digest": self.image_digest,
            },
            "command": list(self.command),
            "env": dict(self.env),
            "cpus": self.cpus,
            "memory_mib": self.memory_mib,
            "timeout_seconds": self.timeout_seconds,
            "retry": {
                "attempts": self.attempts,
                "evaluate_on_exit": [
                    {"on_exit_code": code, "action": action} for code, action in self.evaluate_on_exit
                ],
            },
            "outputs": {
                "prefix": self.output_prefix,
                "key": self.output_key_template,
                "name": None if rule is None else {"pattern": rule[0], "replacement": rule[1], "otherwise": rule[2]},
            },
            "dataset": None if self.dataset is None else dict(self.dataset),
        }

    @property
    def job_key(self) -> str:
        """Where the validated job is stored, beside its queue."""
        return self.prefix + JOB_FILE

    def input_key(self, task: str) -> str:
        return self.input_prefix + _task(task)

    def shared_key(self, name: str) -> str:
        if name not in self.shared:
            raise JobError([f"shared file {_show(name)} is not listed in shared ({', '.join(self.shared) or 'none'})"])
        return self.input_prefix + name

    @property
    def image_archive_key(self) -> str:
        return self.prefix + self.image_archive if self.image_archive else ""

    def selects(self, task: str) -> bool:
        """Whether an object name under input_prefix is a task of a job whose tasks are its inputs."""
        return fnmatchcase(task, self.tasks_pattern) and task not in self.shared

    def output_name(self, task: str) -> str:
        """The {output_name} of ``task``; JobError when the rule makes something that is not a plain name
        (it becomes a file name in the container's output folder)."""
        _task(task)
        if self.output_name_rule is None:
            return task
        pattern, replacement, otherwise = self.output_name_rule
        match = re.fullmatch(pattern, task)
        if match:
            name = match.expand(replacement)
        else:
            name = _expand(otherwise, _simple_lookup({"task": task, "stem": stem(task)}), _OTHERWISE_PLACEHOLDERS)
        problem = task_queue.name_problem(name)
        if problem:
            raise JobError([f"outputs.name makes {_show(name)} of task {task!r}, which {problem}: fix outputs.name"])
        return name

    def output_key(self, task: str, file: str) -> str:
        """The key ``file`` of ``task`` is published under; JobError when it would be unsafe."""
        _task(task)
        values = {"task": task, "stem": stem(task), "file": file}
        relative = _expand(self.output_key_template, _simple_lookup(values), _KEY_PLACEHOLDERS)
        problem = "is empty" if not file else _relative_key_problem(relative)
        if problem is None and any(ord(ch) < 32 or ord(ch) == 127 for ch in relative):
            problem = "contains a control character"
        if problem:
            raise JobError([f"the output key {_show(relative)} of file {_show(file)} of task {task!r} {problem}"])
        return self.output_prefix + relative

    def argv(self, task: str) -> list[str]:
        """The container's arguments for ``task``, placeholders expanded."""
        lookup = _container_lookup(self.shared, _task(task), self.output_name(task))
        return [_expand(arg, lookup, _PLACEHOLDERS) for arg in self.command]

    def environment(self, task: str) -> dict[str, str]:
        """The container's environment for ``task``, placeholders expanded."""
        lookup = _container_lookup(self.shared, _task(task), self.output_name(task))
        return {name: _expand(value, lookup, _PLACEHOLDERS) for name, value in self.env}

    def on_exit(self, code: int) -> str:
        """retry or fail, for a container that exited with ``code`` (non-zero): the first matching rule
        decides; a code no rule matches is retried."""
        text = str(code)
        for glob, action in self.evaluate_on_exit:
            if (glob[:-1] == text[: len(glob) - 1]) if glob.endswith("*") else glob == text:
                return action
        return "retry"


# --- the reference -------------------------------------------------------------------------------------


def slots_for(cpus: float, memory_mib: int, machine_vcpus: int, machine_memory_mib: int) -> int:
    """How many tasks needing ``cpus`` and ``memory_mib`` a machine of that size runs at once: the smaller of
    its vCPUs over cpus and its memory over memory_mib, at least 1 (the worker, and the plan before a launch)."""
    return max(1, min(int(machine_vcpus // cpus), int(machine_memory_mib // memory_mib)))


def _cell(text: str) -> str:
    """Plain text in a Markdown table cell: no column breaks, no emphasis, no HTML tags."""
    return text.replace("|", "\\|").replace("*", "\\*").replace("<", "&lt;").replace("\n", " ")


def _default_text(field: _Field) -> str:
    if field.default is _REQUIRED:
        return "required"
    if field.default is None:
        return "`null`"
    if isinstance(field.default, str):
        return f'`"{field.default}"`'
    return f"`{field.default}`"


def _rows(fields: tuple, path: str):
    for field in fields:
        where = _join(path, field.key)
        yield f"| `{where}` | {field.type} | {_default_text(field)} | {_cell(field.about)} | {_cell(field.rule)} |"
        yield from _rows(field.children, where)
        yield from _rows(field.items, where + "[]")


def _listed(names) -> str:
    return ", ".join(f"`{{{name}}}`" for name, dummy in names)


def reference() -> str:
    """docs/job.md: the field reference, generated from the schema the validation uses."""
    lines = [
        "# The job file",
        "",
        "<!-- Generated from plugins/module_utils/job.py by `python scripts/job-reference.py`: do not edit. -->",
        "",
        "A *job* is any container run over any inputs in S3, one run per task. A job file is YAML with one",
        "top-level key, `cicc_job`, so `ansible-playbook site.yml -e @jobs/xor.yml` works; `jobs/xor.yml` (the",
        "XOR pipeline) and `jobs/summary.yml` are examples. The job is validated before anything changes: every",
        "problem is reported at once, each naming the field (e.g. `retry.evaluate_on_exit[1].action`), the value",
        "given and what would be right. A field not listed here is an error, at any level. The validated job is",
        f"stored under the job's prefix as `{JOB_FILE}`, with every field explicit.",
        "",
        "## Fields",
        "",
        "| field | type | default | what it is | rule |",
        "|---|---|---|---|---|",
    ]
    lines.extend(_rows(_SCHEMA, ""))
    lines += [
        "",
        "## Placeholders",
        "",
        "`command` items and `env` values may use these; `{{` and `}}` are literal braces, and any other `{...}`",
        "or a single brace is an error.",
        "",
        "| placeholder | becomes |",
        "|---|---|",
    ]
    lines.extend(f"| `{{{name}}}` | {_cell(about)} |" for name, about in _PLACEHOLDERS)
    lines += [
        "",
        f"`outputs.key` may use {_listed(_KEY_PLACEHOLDERS)} (it must use `{{file}}`);",
        f"`outputs.name.otherwise` may use {_listed(_OTHERWISE_PLACEHOLDERS)}.",
        "",
    ]
    return "\n".join(lines)
