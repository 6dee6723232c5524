# -*- coding: utf-8 -*-
# Copyright: cicc.cloud contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""cicc-worker: the boot worker of a cicc.cloud instance.

At boot (systemd unit) or by hand, it runs a *job* (plugins/module_utils/job.py): any container over
the job's inputs in S3. The machine carries no job; the instance's user data names the job file in
the bucket ({"job": "s3://BUCKET/PREFIX/job.json"}), read and validated at boot, so one AMI serves
every job. A bad job is refused with a clear log line before anything is claimed.

Then it prepares the job's image (baked into the AMI, loaded from a `docker save` archive in the
bucket and checked by its ID, or pulled from a registry), stages the job's shared files once, and
runs as many slots as the machine's vCPUs and memory allow for the job's CPUs and memory per task.
Each slot loops: claim a task from the S3 queue, stage its input to block storage, run the job's
container on it (input and shared files read-only, an empty output directory), publish every file
the container wrote, then the task's manifest (which makes it done), turn its lock into the task's
finished mark; until no task is left. It heartbeats while a task runs; the job's exit-code rules decide whether a failed run is
retried or fails the task at once. Every attempt, however it ends, goes into the run's trace
(plugins/module_utils/run_trace.py), with the S3 requests it made. An S3 outage or throttling that
outlasts the client's retries is waited out (s3_patience_seconds). At the end it folds the finished
marks into the lists, writes its run's record, uploads its log (<prefix>logs/<instance>/log.txt) and runs
its exit action: terminate its own instance through the EC2 API, with OS shutdown as the fallback.

Machine settings come from a JSON file (--config, written by the worker role) and flags; the
instance id from IMDSv2 on EC2, or from the identity file on the local cloud. Credentials come from
the instance profile through boto3's usual chain: never from a file or the user data.

On a spot interruption notice, or SIGTERM/SIGINT (systemctl stop, a shutdown, Ctrl-C), it stops
claiming, stops its containers, gives back the tasks in progress (the attempt does not count) and
exits within seconds; a second signal exits at once. After a signal the exit action is not run.

Exit codes: 0 queue drained (or the task limit reached, or a spot interruption), 1 unexpected
error, 2 bad settings, a bad job, or a queue that cannot be worked (a shared file or the image is
missing: no task is claimed, so nothing is lost).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, fields
from pathlib import Path

import boto3

try:
    from ansible_collections.cicc.cloud.plugins.module_utils import job as jobs
    from ansible_collections.cicc.cloud.plugins.module_utils import run_trace
    from ansible_collections.cicc.cloud.plugins.module_utils import task_queue
except ImportError:  # on an instance the worker role installs job.py, run_trace.py and task_queue.py beside this file
    import job as jobs  # type: ignore[no-redef]
    import run_trace  # type: ignore[no-redef]
    import task_queue  # type: ignore[no-redef]

LOG = logging.getLogger("cicc-worker")
EXIT_DRAINED, EXIT_ERROR, EXIT_UNWORKABLE = 0, 1, 2
CODE_VERSION = run_trace.code_version(__file__, task_queue.__file__, jobs.__file__, run_trace.__file__)
IMDS = "http://169.254.169.254/latest"
# A slot's leases grow to this many times the last task's claim-to-end time (renewed every third: none for a
# task like it), up to MAX_LEASE_SECONDS; a lease that ran out is taken over after that long.
LEASE_PER_HELD_SECOND = 4
MAX_LEASE_SECONDS = 900
# What the trace says of the machine, besides its instance id (IMDS on AWS, the identity file locally), and when
# it was launched (its boot, from the uptime on EC2; the instance's launch time locally).
MACHINE_FACTS = ("instance_type", "availability_zone", "market", "ami_id", "launched_at")
# What an instance's user data may set: which job to run and how much of it, never a credential.
USER_DATA_SETTINGS = ("job", "max_tasks", "slots", "spectator_pause")
# What a manifest says of each output; "replaced": the ETag of the object a recompute replaced.
FILE_FIELDS = ("name", "key", "size", "etag", "replaced")


class TaskError(Exception):
    """One run of a task failed; the message is recorded as the attempt's reason."""


class Unworkable(Exception):
    """The job cannot be worked on this machine (bad job, missing image or shared file): claim nothing."""


@dataclass
class Settings:
    """The machine's settings: how to reach S3 and where to work. The job is not among them."""

    region: str = "us-east-1"
    endpoint_url: str = ""
    instance_id: str = ""
    # On the local cloud each instance's container gets this file in place of IMDS.
    identity_file: str = "/etc/cicc/identity.json"
    workdir: str = "/var/lib/cicc/work"
    # The job file: s3://BUCKET/KEY (what user data names), or a local JSON file for a run by hand.
    job: str = ""
    lease_seconds: int = 120
    compact_every: int = 20
    spectator_pause: int = 0
    # Tasks to take before stopping; 0: until the queue is drained. 1 is the seed's one task per boot.
    max_tasks: int = 0
    # Tasks run at once; 0: as many as the vCPUs and memory allow for the job's cpus and memory_mib.
    slots: int = 0
    # The instance metadata service, asked every spot_poll_seconds for a spot interruption notice.
    metadata_url: str = IMDS
    spot_poll_seconds: int = 5
    # How long S3 may stay unreachable (or throttle every request) before the worker gives up.
    s3_patience_seconds: int = 600
    exit_action: str = "none"

    @classmethod
    def load(cls, path: str | None, overrides: dict) -> Settings:
        data = json.loads(Path(path).read_text()) if path else {}
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown settings in {path}: {', '.join(sorted(unknown))}")
        data.update({key: value for key, value in overrides.items() if value is not None})
        settings = cls(**data)
        if settings.exit_action not in ("none", "terminate"):
            raise ValueError(f"exit_action must be none or terminate, not {settings.exit_action!r}")
        return settings

    def apply_user_data(self, user_data: str) -> list[tuple[int, str]]:
        """Take the job and its limits from an instance's user data; returns (log level, note) pairs
        saying what was applied and what was ignored, and why."""
        if not user_data.strip():
            return []
        try:
            given = json.loads(user_data)
        except ValueError:
            given = None
        if not isinstance(given, dict):
            return [(logging.WARNING, "user data is not a JSON object naming a job: ignored")]
        notes = []
        for key, value in given.items():
            if key not in USER_DATA_SETTINGS:
                known = ", ".join(USER_DATA_SETTINGS)
                notes.append((logging.WARNING, f"user data sets {key!r}, which it may not ({known}): ignored"))
            elif key == "job" and not (isinstance(value, str) and value.startswith("s3://")):
                notes.append((logging.WARNING, f"user data sets job to {value!r}, not an s3://BUCKET/KEY: ignored"))
            elif key != "job" and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                notes.append(
                    (logging.WARNING, f"user data sets {key} to {value!r}, not a whole number of 0 or more: ignored")
                )
            else:
                setattr(self, key, value)
                notes.append((logging.INFO, f"user data sets {key} to {value}"))
        return notes


def s3_client(settings: Settings, session=None):
    """The worker's S3 client: S3 answers 500/503 now and then under load; retry those patiently
    rather than give up a claimed task. Its pool serves every slot."""
    session = session or boto3.session.Session()
    config = task_queue.s3_config(max_pool_connections=16)
    return session.client("s3", region_name=settings.region, endpoint_url=settings.endpoint_url or None, config=config)


def split_s3_url(url: str) -> tuple[str, str]:
    """("bucket", "key") of s3://bucket/key."""
    bucket, dummy, key = url[len("s3://") :].partition("/")
    if not url.startswith("s3://") or not bucket or not key:
        raise Unworkable(f"the job {url!r} is not an s3://BUCKET/KEY address")
    return bucket, key


def read_job_patiently(client, settings: Settings) -> jobs.Job:
    """read_job, waiting out an S3 outage at boot rather than ending the machine over it."""
    return Patience(settings.s3_patience_seconds).retry(lambda: read_job(client, settings.job))


def read_job(client, location: str) -> jobs.Job:
    """The job named by ``location`` (s3://BUCKET/KEY or a local JSON file), validated.
    Raises Unworkable with every problem the job has."""
    if location.startswith("s3://"):
        bucket, key = split_s3_url(location)
        try:
            raw = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as error:  # noqa: BLE001 - missing, denied or unreachable: all unworkable
            raise Unworkable(f"the job {location} cannot be read: {error}") from error
    else:
        try:
            raw = Path(location).read_bytes()
        except OSError as error:
            raise Unworkable(f"the job file {location} cannot be read: {error}") from error
    try:
        data = json.loads(raw)
    except ValueError as error:
        raise Unworkable(f"the job {location} is not JSON: {error}") from error
    try:
        return jobs.load(data)
    except jobs.JobError as error:
        raise Unworkable(f"the job {location} is refused: {error}") from error


def machine_slots(job: jobs.Job, limit: int = 0) -> int:
    """How many tasks of ``job`` this machine runs at once: its vCPUs over the job's cpus and its
    memory over the job's memory_mib (the smaller), at least 1, at most ``limit`` when given."""
    vcpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    memory_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    slots = jobs.slots_for(job.cpus, job.memory_mib, vcpus, memory_mib)
    return min(slots, limit) if limit else slots


# --- processing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskDirs:
    """A task's directories on this machine, mounted in its container at the job's fixed paths."""

    input: Path
    shared: Path
    output: Path


@dataclass(frozen=True)
class RunResult:
    exit_code: int
    report: str  # the last line the command printed


@dataclass
class Claimed:
    """A task claimed and staged, its lease renewed by ``heartbeat``: ready for its container."""

    lease: task_queue.Lease
    task_dir: Path
    heartbeat: Heartbeat
    staged: dict
    attempt: run_trace.Attempt


class Patience:
    """Waits out an S3 outage or throttling that outlasted the client's own retries: longer and longer
    pauses with jitter, until S3 has failed for ``seconds`` in a row (then wait() says so)."""

    def __init__(self, seconds: float, halt: threading.Event | None = None) -> None:
        self.seconds, self.halt = seconds, halt or threading.Event()
        self._since: float | None = None
        self._waits = 0

    def wait(self, error: BaseException) -> bool:
        """After a transient S3 error: pause and return True, or False once patience is spent."""
        now = time.monotonic()
        self._since = self._since if self._since is not None else now
        if self.halt.is_set():  # stopping: no pause, the caller's loop sees the stop and ends
            return True
        if now - self._since >= self.seconds:
            return False
        pause = min(30.0, 2.0**self._waits) * random.uniform(0.5, 1.0)
        self._waits += 1
        LOG.warning("S3 unavailable (%s): trying again in %.1f s", error, pause)
        self.halt.wait(pause)
        return True

    def reset(self) -> None:
        """S3 answered: the next outage gets the whole patience again."""
        self._since, self._waits = None, 0

    def retry(self, step):
        """step() again after each transient S3 error (or an error one caused), until patience is spent."""
        while True:
            try:
                return step()
            except Exception as error:  # noqa: BLE001 - filtered by transient()
                cause = error if task_queue.transient(error) else error.__cause__
                if cause is None or not task_queue.transient(cause) or not self.wait(cause):
                    raise


class Prefetch(threading.Thread):
    """Runs ``take(*args)`` beside the caller, after ``delay`` seconds or once ``go()`` is called if sooner;
    ``result()`` says go and waits for it, and returns (or raises) what it did."""

    def __init__(self, take, *args, delay: float = 0.0) -> None:
        super().__init__(daemon=True, name=f"{threading.current_thread().name}-prefetch")
        self._take, self._args, self._delay = take, args, delay
        self._go = threading.Event()
        self._result = self._error = None
        self.start()

    def run(self) -> None:
        self._go.wait(self._delay)
        try:
            self._result = self._take(*self._args)
        except BaseException as error:  # noqa: BLE001 - handed to the caller by result()
            self._error = error

    def result(self):
        self._go.set()
        self.join()
        if self._error is not None:
            raise self._error
        return self._result


class DockerRunner:
    """Runs the job's image on a staged task: input and shared files read-only, the output writable.
    Its containers carry the label cicc.worker=<owner>, so that none outlives its worker: a worker
    starting removes those an earlier run of the same owner left (killed before it could)."""

    def __init__(self, owner: str = "") -> None:
        import docker  # the docker SDK: only needed where containers run

        self.client = docker.from_env()
        self.owner = owner
        self._running: dict[int, object] = {}
        self._lock = threading.Lock()

    def prepare(self, job: jobs.Job, fetch) -> str:
        """Make the job's image available; returns its ID. ``fetch(key, path)`` downloads an object of
        the job's bucket (the archive). Raises Unworkable when the image cannot be had."""
        import docker.errors

        if self.owner:
            for left in self.client.containers.list(
                all=True, filters={"label": f"cicc.worker={self.owner}"}, ignore_removed=True
            ):
                LOG.warning("removing container %s left by an earlier run of this worker", left.short_id)
                left.remove(force=True)
        try:
            if job.image_source == "archive":
                image = self._load_archive(job, fetch)
            elif job.image_source == "registry":
                image = self.client.images.pull(job.image_name, auth_config=registry_auth(job))
            else:
                image = self.client.images.get(job.image_name)
        except docker.errors.ImageNotFound as error:
            raise Unworkable(
                f"image {job.image_name} is not on this machine: bake it into the AMI (image.source baked, "
                "cicc_baked_images) or deliver it from the bucket (image.source archive)"
            ) from error
        except docker.errors.DockerException as error:
            raise Unworkable(f"image {job.image_name} could not be prepared: {error}") from error
        if job.image_digest and image.id != job.image_digest:
            raise Unworkable(f"image {job.image_name} is {image.id}, not the {job.image_digest} the job asks for")
        return image.id

    def _load_archive(self, job: jobs.Job, fetch):
        archive = Path(fetch(job.image_archive_key))
        try:
            with archive.open("rb") as data:
                loaded = self.client.images.load(data)
        finally:
            archive.unlink(missing_ok=True)
        if len(loaded) != 1:
            raise Unworkable(f"s3://{job.bucket}/{job.image_archive_key} holds {len(loaded)} images, not one")
        image = loaded[0]
        if job.image_name not in image.tags:
            # The name the job runs it by: repository and tag (the tag after the last ":" of the last segment).
            repository, tag = job.image_name, "latest"
            if ":" in job.image_name.rsplit("/", 1)[-1]:
                repository, tag = job.image_name.rsplit(":", 1)
            image.tag(repository, tag)
        return image

    def run(self, job: jobs.Job, task: str, dirs: TaskDirs, image_id: str) -> RunResult:
        from requests.exceptions import ConnectionError as RequestsConnectionError, ReadTimeout

        volumes = {
            str(dirs.input): {"bind": jobs.CONTAINER_INPUT_DIR, "mode": "ro"},
            str(dirs.shared): {"bind": jobs.CONTAINER_SHARED_DIR, "mode": "ro"},
            str(dirs.output): {"bind": jobs.CONTAINER_OUTPUT_DIR, "mode": "rw"},
        }
        container = self.client.containers.run(
            image_id,
            job.argv(task),
            environment=job.environment(task),
            volumes=volumes,
            network_mode="none",
            nano_cpus=int(job.cpus * 1e9),
            mem_limit=f"{job.memory_mib}m",
            labels={"cicc.task": task, "cicc.job": job.name, "cicc.worker": self.owner},
            detach=True,
        )
        with self._lock:
            self._running[threading.get_ident()] = container
        try:
            try:
                code = container.wait(timeout=job.timeout_seconds)["StatusCode"]
            except (ReadTimeout, RequestsConnectionError) as error:
                container.kill()
                raise TaskError(f"timed out after {job.timeout_seconds} s") from error
            report = container.logs(stdout=True, stderr=True).decode("utf-8", "replace").strip()
        finally:
            with self._lock:
                self._running.pop(threading.get_ident(), None)
            container.remove(force=True)
        return RunResult(code, report.splitlines()[-1] if report else "")

    def cancel(self) -> None:
        """Stop every running container: their runs then fail without an output."""
        with self._lock:
            running = list(self._running.values())
        for container in running:
            try:
                container.kill()
            except Exception as error:  # noqa: BLE001 - it may have just ended by itself
                LOG.info("could not stop a processing container: %s", error)


def registry_auth(job: jobs.Job) -> dict | None:
    """Credentials for an ECR registry from the instance profile; None for any other registry."""
    host = job.image_name.split("/", 1)[0]
    if ".dkr.ecr." not in host:
        return None
    import base64

    region = host.split(".dkr.ecr.", 1)[1].split(".", 1)[0]
    token = boto3.client("ecr", region_name=region).get_authorization_token()["authorizationData"][0]
    user, password = base64.b64decode(token["authorizationToken"]).decode().split(":", 1)
    return {"username": user, "password": password}


class ProcessRunner:
    """Runs a program on the host in place of the job's image: the job's command, with the
    container's paths replaced by the task's directories (tests and runs by hand)."""

    def __init__(self, program: str) -> None:
        self.program = program
        self._processes: dict[int, subprocess.Popen] = {}

    def prepare(self, job: jobs.Job, fetch) -> str:
        return ""

    def run(self, job: jobs.Job, task: str, dirs: TaskDirs, image_id: str) -> RunResult:
        paths = (
            (jobs.CONTAINER_INPUT_DIR, str(dirs.input)),
            (jobs.CONTAINER_SHARED_DIR, str(dirs.shared)),
            (jobs.CONTAINER_OUTPUT_DIR, str(dirs.output)),
        )

        def local(value: str) -> str:
            for inside, outside in paths:
                value = value.replace(inside, outside)
            return value

        argv = [sys.executable, self.program] + [local(arg) for arg in job.argv(task)]
        env = {**os.environ, **{key: local(value) for key, value in job.environment(task).items()}}
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as process:
            self._processes[threading.get_ident()] = process
            try:
                report = process.communicate(timeout=job.timeout_seconds)[0].strip()
            except subprocess.TimeoutExpired as error:
                process.kill()
                raise TaskError(f"timed out after {job.timeout_seconds} s") from error
            finally:
                self._processes.pop(threading.get_ident(), None)
        return RunResult(process.returncode, report.splitlines()[-1] if report else "")

    def cancel(self) -> None:
        for process in list(self._processes.values()):
            process.kill()


# --- the worker -----------------------------------------------------------------------------------


class Heartbeat(threading.Thread):
    """Renews a lease every third of the lease until stopped, a failed renewal again within seconds (so
    throttling does not let the lease run out between two tries); notes when the lease was lost."""

    def __init__(self, client, queue: task_queue.Queue, lease: task_queue.Lease, charge=lambda: None) -> None:
        super().__init__(daemon=True)
        self.client, self.queue, self.lease = client, queue, lease
        self.lost = threading.Event()
        self._halt = threading.Event()
        self._charge = charge  # run in its thread: its requests are the attempt's

    def run(self) -> None:
        self._charge()
        period = pause = self.lease.lease_seconds / 3
        while not self._halt.wait(pause):
            try:
                task_queue.renew(self.client, self.queue, self.lease)
                pause = period
            except task_queue.LeaseLost as error:
                LOG.warning("%s", error)
                self.lost.set()
                return
            except Exception as error:  # noqa: BLE001 - a passing S3 error must not kill the heartbeat
                LOG.warning("heartbeat for %s failed, retrying: %s", self.lease.name, error)
                pause = min(period, random.uniform(1.0, 2.0))

    def stop(self) -> None:
        """Stop renewing (idempotent)."""
        self._halt.set()
        if self.is_alive():
            self.join()


class SpotWatch(threading.Thread):
    """Asks the metadata service for a spot interruption notice every few seconds. On a notice it
    sets ``noticed`` and cancels the running tasks, so the worker gives them back and stops within the
    two minutes AWS gives."""

    def __init__(self, settings: Settings, runner) -> None:
        super().__init__(daemon=True)
        self.settings, self.runner = settings, runner
        self.noticed = threading.Event()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.settings.spot_poll_seconds):
            if spot_interruption(self.settings):
                LOG.warning("spot interruption notice: no more claims, giving back the tasks in progress")
                self.noticed.set()
                self.runner.cancel()
                return

    def stop(self) -> None:
        self._halt.set()


class Worker:
    def __init__(
        self,
        settings: Settings,
        client,
        job: jobs.Job,
        runner,
        owner: str = "",
        spot_watch: SpotWatch | None = None,
        machine: dict | None = None,
    ) -> None:
        self.settings, self.client, self.job, self.runner = settings, client, job, runner
        self.queue = task_queue.Queue(job.bucket, job.prefix, settings.lease_seconds, job.attempts, job.input_prefix)
        self.owner = owner or settings.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        # Instances of the local cloud share the host's work directory: each worker keeps to its own.
        self.workdir = (Path(settings.workdir) / self.owner).resolve()
        self.shared_dir = self.workdir / "shared"
        self.done: list[str] = []
        self.failed: list[str] = []
        # Claims worked on, whatever their outcome: what max_tasks counts (slots share it).
        self.taken = 0
        self.slots = 1
        self.image_id = ""
        self.spot_watch = spot_watch
        self._lock = threading.Lock()
        self._rejected: list[tuple[str, str]] = []
        self._shared: list[dict] = []
        self._held: set[str] = set()
        self._stop = threading.Event()
        self._stop_reason = ""
        # Slots stopped by an unexpected error: the run then ends with EXIT_ERROR.
        self.failed_slots = 0
        # What the machine is (instance_metadata), for the trace and the manifests.
        self.machine = {key: (machine or {}).get(key, "") for key in MACHINE_FACTS}
        self.requests = run_trace.RequestCounter()
        self.requests.attach(client)
        self.started_at = time.time()
        self.trace: run_trace.TraceLog | None = None
        self._first_claim_at = self._last_end_at = 0.0

    @property
    def log_key(self) -> str:
        return f"{self.job.prefix}logs/{self.owner}/log.txt"

    def run(self) -> int:
        """Work the queue until it is drained. Returns the exit code."""
        self.started_at = time.time()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._spectator_pause()
        try:
            self._stage_shared()
            self.image_id = self.runner.prepare(self.job, self._fetch)
        except (Unworkable, task_queue.BadInput) as error:
            LOG.error("%s; no task claimed", error)
            return EXIT_UNWORKABLE
        self.slots = machine_slots(self.job, self.settings.slots)
        self.trace = run_trace.TraceLog(
            self.client, self.job.bucket, self.job.prefix, self.owner, run_trace.run_id(self.started_at), self._common()
        )
        LOG.info(
            "job %s: image %s%s, %d slot(s) of %s CPU and %d MiB",
            self.job.name,
            self.job.image_name,
            f" ({self.image_id})" if self.image_id else "",
            self.slots,
            f"{self.job.cpus:g}",
            self.job.memory_mib,
        )
        started = time.monotonic()
        if self.spot_watch:
            self.spot_watch.start()
        try:
            threads = [threading.Thread(target=self._slot, args=(n,), name=f"slot{n}") for n in range(self.slots)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            if self.spot_watch:
                self.spot_watch.stop()
        for line, reason in self._rejected:
            LOG.warning("tasklist line %r rejected: %s (recorded in rejected.txt)", line, reason)
        self._compact(force=True)
        stopped = self.stop_reason or ("task limit reached" if self._at_limit() else "queue drained")
        LOG.info(
            "%s: %d completed, %d failed by %s in %.1f s",
            stopped,
            len(self.done),
            len(self.failed),
            self.owner,
            time.monotonic() - started,
        )
        code = EXIT_ERROR if self.failed_slots else EXIT_DRAINED
        self._record_run(stopped, code)
        return code

    def _provenance(self) -> dict:
        """What every trace row, manifest and the run's record say of how: job, worker, machine, code."""
        return {
            "job": self.job.name,
            "worker": self.owner,
            "instance_id": self.settings.instance_id,
            **self.machine,
            "code_version": CODE_VERSION,
        }

    def _common(self) -> dict:
        """What every trace row and the run's record share: the provenance and the image."""
        return {**self._provenance(), "image": self.job.image_name, "image_id": self.image_id}

    def _trace(self, attempt: run_trace.Attempt) -> None:
        attempt.ended_at = attempt.ended_at or time.time()  # not run (or not to its end): ended now
        with self._lock:
            self._first_claim_at = min(self._first_claim_at or attempt.claimed_at, attempt.claimed_at)
            self._last_end_at = max(self._last_end_at, attempt.ended_at)
        try:
            self.trace.add(attempt)
        except Exception as error:  # noqa: BLE001 - kept for the next batch; the queue state is safe either way
            LOG.warning("could not write the trace: %s", error)

    def _record_run(self, stopped: str, code: int) -> None:
        """The trace's last batch, then this run's record (best effort: the queue state is safe either way)."""
        try:
            self.trace.flush()
            record = {
                **self._common(),
                "run": run_trace.run_id(self.started_at),
                "started_at": round(self.started_at, 3),
                "first_claim_at": round(self._first_claim_at, 3),
                "last_end_at": round(self._last_end_at, 3),
                "stopped_at": round(time.time(), 3),
                "stop_reason": stopped,
                "exit_code": code,
                "slots": self.slots,
                "completed": len(self.done),
                "failed": len(self.failed),
                "attempts": self.trace.written,
                "requests": self.requests.total + 1,  # this record's own PUT included
                "write_requests": self.requests.billed[run_trace.WRITE] + 1,
                "read_requests": self.requests.billed[run_trace.READ],
                "requests_outside_attempts": self.requests.unattributed + 1,
            }
            key = run_trace.worker_key(self.job.prefix, self.owner, record["run"])
            body = json.dumps(record, indent=1, sort_keys=True).encode()
            self.client.put_object(Bucket=self.job.bucket, Key=key, Body=body, IfNoneMatch="*")
        except Exception as error:  # noqa: BLE001
            LOG.warning("could not write the run's record and trace: %s", error)

    def _slot(self, number: int) -> None:
        """One slot's loop until nothing is left, the limit is reached or a notice came: while one task's
        container runs, the next task is claimed and its input staged (prefetch), so the slot does not
        wait for downloads. The look ahead does not wait for tasks that others hold (one may be this
        slot's own); once the task in hand is done, the slot looks again, patiently. An S3 outage is
        waited out: the task in hand when it came is left to its lease (another slot or worker takes
        it over once the lease has run out) and the slot goes on with the task it claimed ahead."""
        owner = self.owner if self.slots == 1 else f"{self.owner}#{number}"
        picker = task_queue.TaskPicker(
            self.client,
            self.queue,
            owner,
            self.settings.instance_id,
            min(5.0, self.settings.lease_seconds / 4),
            self.settings.compact_every,
        )
        patience = Patience(self.settings.s3_patience_seconds, self._stop)
        current = following = None
        ahead = 0.0  # how long a task may run before the next one is claimed: its lease then starts late
        while True:
            try:
                current = current or self._take(picker)
                if current is None:
                    break
                following = Prefetch(self._take, picker, False, delay=ahead)
                self.work(current)
                ahead = self._claim_ahead_after(current.attempt)
                picker.lease_seconds = self._lease_after(current.attempt)
                patience.reset()
                if picker.compaction_due:
                    picker.compaction_due = False
                    self._compact()
                current, following = following.result(), None
            except Exception as error:  # noqa: BLE001 - one slot's error must not leave the others' work unlogged
                current, following = self._staged_ahead(following), None
                if task_queue.transient(error) and patience.wait(error):
                    continue
                LOG.exception("slot %d stopped by an unexpected error", number)
                self.failed_slots += 1
                self._give_back_staged(current)
                break
        with self._lock:
            self._rejected = self._rejected or picker.rejected

    @staticmethod
    def _claim_ahead_after(attempt: run_trace.Attempt) -> float:
        """When to claim the next task while one runs, from the task just done: soon enough to stage it
        twice over before this one ends, no sooner (a lease held waiting costs renewals)."""
        if not (attempt.started_at and attempt.ended_at and attempt.staged_at):
            return 0.0
        run, stage = attempt.ended_at - attempt.started_at, attempt.staged_at - attempt.claimed_at
        return max(0.0, run - 2 * stage - 2.0)

    def _lease_after(self, attempt: run_trace.Attempt) -> int:
        """The lease of the slot's next claims, from the task just done: long enough that a task like it needs
        no renewal (from its claim to its end within a third of the lease, with room to spare), never shorter
        than the setting, at most MAX_LEASE_SECONDS (a lease's lock is padded by its length)."""
        if not (attempt.claimed_at and attempt.ended_at):
            return self.settings.lease_seconds
        held = attempt.ended_at - attempt.claimed_at
        return max(self.settings.lease_seconds, min(MAX_LEASE_SECONDS, int(LEASE_PER_HELD_SECOND * held) + 1))

    @staticmethod
    def _staged_ahead(prefetch: Prefetch | None) -> Claimed | None:
        """What the look ahead claimed, once it is done; None if it claimed nothing or failed."""
        try:
            return prefetch.result() if prefetch else None
        except Exception:  # noqa: BLE001 - what it claimed, if anything, is left to its lease
            return None

    def _give_back_staged(self, staged: Claimed | None) -> None:
        """A task claimed ahead for a slot that stopped: given back at once, the attempt not counted."""
        if staged is None:
            return
        staged.heartbeat.stop()
        self.requests.charge(staged.attempt)
        try:
            task_queue.release(self.client, self.queue, staged.lease)
            staged.attempt.ended(run_trace.GIVEN_BACK, "its slot stopped")
        except Exception as error:  # noqa: BLE001 - its lease runs out and another worker takes it over
            LOG.warning("could not give back the task claimed ahead: %s", error)
            staged.attempt.ended(run_trace.ABANDONED, f"its slot stopped and could not give it back: {error}")
        finally:
            self.requests.charge(None)
        self._trace(staged.attempt)
        self._let_go(staged.lease, staged.task_dir)

    def _take(self, picker: task_queue.TaskPicker, patient: bool = True) -> Claimed | None:
        """Claim the next task and stage its input, its lease renewed from the claim on. A task whose
        input cannot be staged is recorded failed, and the next one taken. None when nothing is left
        (or, not ``patient``, nothing is free now). The S3 requests on the way are the attempt's."""
        attempt = run_trace.Attempt("", 0, picker.owner)
        self.requests.charge(attempt)
        try:
            while not self._interrupted() and self._reserve():
                try:
                    lease = picker.next(stopped=self._interrupted, wait=patient, mine=self._holding)
                except BaseException:
                    self._unreserve()
                    raise
                if lease is None:
                    self._unreserve()
                    break
                with self._lock:
                    self._held.add(lease.name)
                LOG.info("claimed %s (attempt %d)", lease.name, lease.attempts)
                attempt.task, attempt.attempt, attempt.claimed_at = lease.name, lease.attempts, time.time()
                task_dir = self._task_dir(lease)
                heartbeat = Heartbeat(self.client, self.queue, lease, functools.partial(self.requests.charge, attempt))
                heartbeat.start()
                try:
                    staged = self._stage_input(lease.name, task_dir / "input")
                except task_queue.BadInput as error:
                    heartbeat.stop()
                    attempt.ended(self._give_back(lease, error, fail_now=True), str(error))
                    self._trace(attempt)
                    self._let_go(lease, task_dir)
                    attempt = run_trace.Attempt("", 0, picker.owner)
                    self.requests.charge(attempt)
                    continue
                except BaseException as error:
                    heartbeat.stop()
                    attempt.ended(run_trace.ABANDONED, str(error))
                    self._trace(attempt)
                    self._let_go(lease, task_dir)
                    raise
                attempt.staged_at, attempt.bytes_in, attempt.input_etag = time.time(), staged["size"], staged["etag"]
                return Claimed(lease, task_dir, heartbeat, staged, attempt)
            return None
        finally:
            if not attempt.task:  # nothing claimed: the tries were the worker's
                self.requests.unattribute(attempt)
            self.requests.charge(None)

    def _reserve(self) -> bool:
        """Count a claim about to be made against max_tasks; False once the limit is reached."""
        with self._lock:
            if 0 < self.settings.max_tasks <= self.taken:
                return False
            self.taken += 1
            return True

    def _unreserve(self) -> None:
        with self._lock:
            self.taken -= 1

    def request_stop(self, reason: str) -> None:
        """Stop cleanly (a signal, as rq's worker's warm shutdown): claim no more, stop the running
        containers and give their tasks back without counting an attempt; run() then returns."""
        LOG.warning("%s: no more claims, giving back the tasks in progress", reason)
        self._stop_reason = reason
        self._stop.set()
        self.runner.cancel()

    @property
    def stop_reason(self) -> str:
        """Why the worker stops before the queue is drained: a signal, a spot notice, or "" (it does not)."""
        if self._stop.is_set():
            return self._stop_reason
        return "spot interruption" if self.spot_watch is not None and self.spot_watch.noticed.is_set() else ""

    def _interrupted(self) -> bool:
        return bool(self.stop_reason)

    def _at_limit(self) -> bool:
        return 0 < self.settings.max_tasks <= self.taken

    def _compact(self, **kwargs) -> None:
        """Fold the finished marks into the lists, best effort: what is not folded stays marked
        (task_info counts it) and the next compaction, by any worker or person, folds it."""
        try:
            task_queue.compact(self.client, self.queue, **kwargs)
        except Exception as error:  # noqa: BLE001 - an S3 error here must not stop the worker
            LOG.warning("compaction failed, left to the next one: %s", error)

    def work(self, task: Claimed) -> None:
        """Process one claimed, staged task; whatever happens, it ends published, released or failed,
        and the attempt goes into the trace."""
        lease, heartbeat, attempt = task.lease, task.heartbeat, task.attempt
        self.requests.charge(attempt)
        dirs = TaskDirs(task.task_dir / "input", self.shared_dir, task.task_dir / "output")
        try:
            if self._interrupted():  # the stop came while the task waited for its turn
                raise TaskError(self.stop_reason)
            # A task claimed ahead may have waited out an outage: run it only on a lease still this worker's.
            self._patiently(lambda: task_queue.ensure_live(self.client, self.queue, lease))
            if heartbeat.lost.is_set():
                raise task_queue.LeaseLost(f"lease on {lease.name} lost before it ran")
            attempt.started_at = time.time()
            result = self.runner.run(self.job, lease.name, dirs, self.image_id)
            attempt.ended_at, attempt.exit_code = time.time(), result.exit_code
            heartbeat.stop()
            if heartbeat.lost.is_set():
                raise task_queue.LeaseLost(f"lease on {lease.name} lost while processing")
            if result.exit_code != 0:
                attempt.ended(*self._failed_run(lease, result))
                return
            files = self._patiently(lambda: self._publish(lease, dirs.output))
            attempt.bytes_out = sum(entry["size"] for entry in files)
            attempt.output_etags = [entry["etag"] for entry in files]
            manifest = self._manifest(lease, task.staged, files, result, attempt)
            self._patiently(lambda: task_queue.publish_manifest(self.client, self.queue, lease, manifest))
            self._patiently(lambda: task_queue.complete(self.client, self.queue, lease, published=True))
            attempt.published_at = manifest["published_at"]
            attempt.ended(run_trace.DONE)
            with self._lock:
                self.done.append(lease.name)
            LOG.info("completed %s: %d file(s) published; %s", lease.name, len(files), result.report or "no report")
        except (task_queue.BadInput, TaskError) as error:
            heartbeat.stop()  # the lock is rewritten below: no renewal may race with it
            if self._interrupted():
                attempt.ended(*self._hand_back(lease))
            else:
                attempt.ended(
                    self._give_back(lease, error, fail_now=isinstance(error, task_queue.BadInput)), str(error)
                )
        except task_queue.LeaseLost as error:
            LOG.warning("%s: not publishing, moving on", error)
            attempt.ended(run_trace.LOST, str(error))
        except BaseException as error:
            attempt.ended(run_trace.ABANDONED, str(error))
            raise
        finally:
            heartbeat.stop()
            self._trace(attempt)
            self.requests.charge(None)
            self._let_go(lease, task.task_dir)

    def _patiently(self, step):
        """Run a publishing step again while S3 fails in passing (an outage, throttling past the client's
        retries): what the container made is not left to a lease that runs out, to be made again by
        another worker. Each step is idempotent (an output or manifest already there with these bytes
        counts as written; a mark already made is refused, not doubled). A stop does not cut the wait
        short: the work is done."""
        return Patience(self.settings.s3_patience_seconds).retry(step)

    def _let_go(self, lease: task_queue.Lease, task_dir: Path) -> None:
        """The task is out of this worker's hands: its directory goes."""
        shutil.rmtree(task_dir, ignore_errors=True)
        with self._lock:
            self._held.discard(lease.name)

    def _holding(self) -> frozenset:
        """The tasks this worker's slots hold now."""
        with self._lock:
            return frozenset(self._held)

    def _hand_back(self, lease: task_queue.Lease) -> tuple[str, str]:
        """Give a task back at once, the attempt not counted (the stop is not the task's fault: the next
        worker takes it straight away); returns the attempt's (outcome, reason)."""
        try:
            task_queue.release(self.client, self.queue, lease)
        except task_queue.LeaseLost as error:
            LOG.warning("%s: nothing to give back", error)
            return run_trace.LOST, str(error)
        LOG.warning("gave back %s (%s)", lease.name, self.stop_reason)
        return run_trace.GIVEN_BACK, self.stop_reason

    def _failed_run(self, lease: task_queue.Lease, result: RunResult) -> tuple[str, str]:
        """Give back a task whose command failed; returns the attempt's (outcome, reason)."""
        if self._interrupted():
            return self._hand_back(lease)
        action = self.job.on_exit(result.exit_code)
        reason = f"exited with code {result.exit_code} ({action} by the job's rules): {result.report or 'no message'}"
        return self._give_back(lease, TaskError(reason), fail_now=action == "fail"), reason

    def _publish(self, lease: task_queue.Lease, output_dir: Path) -> list[dict]:
        """Every regular file the command wrote, published under the job's output keys."""
        files = sorted(path for path in output_dir.rglob("*") if not path.is_dir())
        if not files:
            raise TaskError(f"exited 0 but wrote nothing to {jobs.CONTAINER_OUTPUT_DIR}")
        published = []
        for path in files:
            relative = path.relative_to(output_dir).as_posix()
            if path.is_symlink():
                raise task_queue.BadInput(f"output {relative} is a symbolic link; write regular files only")
            try:
                key = self.job.output_key(lease.name, relative)
            except jobs.JobError as error:
                raise task_queue.BadInput(f"output {relative}: {error}") from error
            entry = task_queue.publish_file(self.client, self.queue, lease, key, path)
            published.append({"name": relative, **entry})
        return published

    def _manifest(self, lease, staged: dict, files: list[dict], result: RunResult, attempt: run_trace.Attempt) -> dict:
        """How the outputs were made: input, shared files, image, command, machine, code, attempt, times."""
        return {
            **self._provenance(),
            "attempt": lease.attempts,
            "owner": lease.owner,
            "input": staged,
            "shared": self._shared,
            "image": {"name": self.job.image_name, "id": self.image_id},
            "command": self.job.argv(lease.name),
            "exit_code": result.exit_code,
            "files": [{key: entry[key] for key in FILE_FIELDS if key in entry} for entry in files],
            **{name: round(getattr(attempt, name), 3) for name in run_trace.TIMES[:4]},
            "published_at": round(time.time(), 3),
        }

    def _give_back(self, lease: task_queue.Lease, error: Exception, fail_now: bool) -> str:
        """Record a failed attempt: a bad input or a failing exit code fails the task at once, any other
        error counts an attempt (after the job's attempts the task is recorded failed). Returns the
        attempt's outcome."""
        try:
            if fail_now:
                task_queue.fail(self.client, self.queue, lease, str(error))
                state = "failed"
            else:
                state = task_queue.release(self.client, self.queue, lease, str(error))
        except task_queue.LeaseLost as lost:
            LOG.warning("attempt at %s failed (%s) but %s", lease.name, error, lost)
            return run_trace.LOST
        if state == "failed":
            with self._lock:
                self.failed.append(lease.name)
        LOG.error("attempt %d at %s failed (task now %s): %s", lease.attempts, lease.name, state, error)
        return run_trace.FAILED if state == "failed" else run_trace.RETRIED

    def _task_dir(self, lease: task_queue.Lease) -> Path:
        """A directory of this claim's own: after an outage the worker may take over its own expired lease on a
        task it still holds, and the two claims' files must not meet."""
        task_dir = (self.workdir / "tasks" / f"{task_queue.check_name(lease.name)}.{lease.token[:12]}").resolve()
        if task_dir.parent != self.workdir / "tasks":  # belt and braces: names never leave the work area
            raise task_queue.BadTaskName(f"task name {lease.name!r} would leave the work area")
        shutil.rmtree(task_dir, ignore_errors=True)
        (task_dir / "input").mkdir(parents=True)
        (task_dir / "output").mkdir()
        # The container may run as any user: it must be able to write its outputs.
        os.chmod(task_dir / "output", 0o777)  # noqa: S103
        return task_dir

    def _fetch(self, key: str) -> str:
        """Download an object of the job's bucket into the work directory (the image archive)."""
        path = self.workdir / "images" / key.rsplit("/", 1)[-1]
        path.parent.mkdir(parents=True, exist_ok=True)
        if task_queue.download(self.client, self.queue, key, path) is None:
            raise Unworkable(f"s3://{self.job.bucket}/{key} is missing")
        return str(path)

    def _stage_shared(self) -> None:
        """The job's shared files, once per machine, for every slot and task (mounted read-only)."""
        self.shared_dir.mkdir(parents=True, exist_ok=True)
        self._shared = []
        for name in self.job.shared:
            key = self.job.shared_key(name)
            etag = task_queue.download(self.client, self.queue, key, self.shared_dir / name)
            if etag is None:
                raise Unworkable(f"shared file s3://{self.job.bucket}/{key} is missing")
            size = (self.shared_dir / name).stat().st_size
            if size == 0:
                raise Unworkable(f"shared file s3://{self.job.bucket}/{key} is empty")
            self._shared.append({"key": key, "etag": etag, "size": size})

    def _stage_input(self, name: str, input_dir: Path) -> dict:
        free = shutil.disk_usage(input_dir).free
        key = self.queue.input_key(name)
        # A third of the free space: the input, the outputs and the other slots' tasks share the disk.
        etag = task_queue.download(self.client, self.queue, key, input_dir / name, max_bytes=free // 3)
        if etag is None:
            raise task_queue.BadInput(f"input s3://{self.queue.bucket}/{key} is missing")
        return {"key": key, "etag": etag, "size": (input_dir / name).stat().st_size}

    def _spectator_pause(self) -> None:
        """The seed's pause at boot, so that someone can log in and watch (off by default)."""
        remaining = self.settings.spectator_pause
        while remaining > 0:
            LOG.info("spectator pause: starting work in %d s", remaining)
            time.sleep(min(60, remaining))
            remaining -= 60


# --- identity, log and exit -----------------------------------------------------------------------


# Where IMDS says each fact of MACHINE_FACTS (instance-life-cycle is "spot" or "on-demand").
IMDS_FACTS = {
    "instance_type": "meta-data/instance-type",
    "availability_zone": "meta-data/placement/availability-zone",
    "market": "meta-data/instance-life-cycle",
    "ami_id": "meta-data/ami-id",
}


def instance_metadata(settings: Settings, timeout: float = 2.0) -> dict:
    """This instance's id, user data and MACHINE_FACTS: from the identity file the local cloud provides,
    else through IMDSv2 (a session token first); empty strings off EC2 and for what is not known."""
    known = dict.fromkeys(("instance_id", "user_data", *MACHINE_FACTS), "")
    try:
        identity = json.loads(Path(settings.identity_file).read_text())
    except (OSError, ValueError):
        identity = None
    if isinstance(identity, dict) and identity.get("instance_id"):
        return {key: str(identity.get(key, "")) for key in known}
    try:
        token = _imds_token(settings, timeout)
        known["instance_id"] = _imds_get(settings, "meta-data/instance-id", timeout, token)
    except OSError:
        return known
    for key, path in {"user_data": "user-data", **IMDS_FACTS}.items():
        try:
            known[key] = _imds_get(settings, path, timeout, token)
        except OSError:  # user-data: 404 when launched without any
            pass
    try:  # an EC2 machine is its own VM: it booted when its uptime began
        known["launched_at"] = f"{time.time() - float(Path('/proc/uptime').read_text().split()[0]):.3f}"
    except (OSError, ValueError, IndexError):
        pass
    return known


def _imds_token(settings: Settings, timeout: float = 2.0) -> str:
    """An IMDSv2 session token (valid 5 minutes); raises OSError off EC2."""
    request = urllib.request.Request(
        f"{settings.metadata_url}/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"}
    )
    return urllib.request.urlopen(request, timeout=timeout).read().decode()


def _imds_get(settings: Settings, path: str, timeout: float = 2.0, token: str = "") -> str:
    """GET a metadata path with an IMDSv2 session token (a new one unless given); raises OSError (HTTPError
    on 404)."""
    token = token or _imds_token(settings, timeout)
    request = urllib.request.Request(f"{settings.metadata_url}/{path}", headers={"X-aws-ec2-metadata-token": token})
    return urllib.request.urlopen(request, timeout=timeout).read().decode()


def spot_interruption(settings: Settings) -> bool:
    """Whether AWS has scheduled this spot instance's interruption (the path answers 404 until then)."""
    try:
        return bool(_imds_get(settings, "meta-data/spot/instance-action"))
    except OSError:
        return False


def upload_log(client, bucket: str, key: str, log_file: Path) -> None:
    try:
        client.upload_file(str(log_file), bucket, key)
    except Exception as error:  # noqa: BLE001 - the log is a courtesy; the queue state is already safe
        LOG.warning("could not upload the log to s3://%s/%s: %s", bucket, key, error)


def terminate_self(settings: Settings, session) -> None:
    """Terminate this instance through the API; if that is refused, shut the OS down (the
    instance is launched with shutdown behaviour 'terminate', so the result is the same)."""
    try:
        ec2 = session.client("ec2", region_name=settings.region, endpoint_url=settings.endpoint_url or None)
        ec2.terminate_instances(InstanceIds=[settings.instance_id])
        LOG.info("terminating instance %s", settings.instance_id)
    except Exception as error:  # noqa: BLE001
        LOG.error("TerminateInstances refused (%s); shutting down instead", error)
    subprocess.run(["systemctl", "poweroff"], check=False)


def stop_on_signals(worker: Worker) -> None:
    """SIGTERM or SIGINT (systemctl stop, a shutdown, Ctrl-C): stop cleanly (Worker.request_stop);
    a second one: exit at once."""

    def handle(signum, frame) -> None:
        if worker.stop_reason.startswith("stopped by"):
            os._exit(128 + signum)
        # Not from the handler itself: it may run while the interrupted thread holds the logging lock.
        name = signal.Signals(signum).name
        threading.Thread(target=worker.request_stop, args=(f"stopped by {name}",), daemon=True).start()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--config", help="JSON settings file (the worker role writes /etc/cicc/worker.json)")
    for field in fields(Settings):
        parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name, type=type(field.default))
    parser.add_argument("--runner", choices=("docker", "process"), default="docker")
    parser.add_argument("--program", default=str(Path(__file__).resolve().parents[1] / "container" / "process.py"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {field.name: getattr(args, field.name) for field in fields(Settings)}
    try:
        settings = Settings.load(args.config, overrides)
    except (OSError, ValueError, TypeError) as error:
        print(f"cicc-worker: {error}", file=sys.stderr)
        return EXIT_UNWORKABLE
    notes, on_ec2, machine = [], False, {}
    if not settings.instance_id:
        machine = instance_metadata(settings)
        settings.instance_id = machine["instance_id"]
        notes = settings.apply_user_data(machine["user_data"])
        # What the command line says beats the user data (a job run by hand on a fleet machine).
        for key, value in overrides.items():
            if value is not None:
                setattr(settings, key, value)
        # On EC2 (not the local cloud, whose identity file stands in for the metadata service) a spot
        # instance may be reclaimed: watch for the notice.
        on_ec2 = bool(settings.instance_id) and not Path(settings.identity_file).exists()
    owner = settings.instance_id or f"{socket.gethostname()}-{os.getpid()}"
    runner = DockerRunner(owner) if args.runner == "docker" else ProcessRunner(args.program)
    spot_watch = SpotWatch(settings, runner) if on_ec2 else None
    log_file = Path(settings.workdir).resolve() / owner / "log.txt"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s [%(threadName)s] %(message)s",
        handlers=[logging.StreamHandler(), logging.FileHandler(log_file)],
    )
    for level, note in notes:
        LOG.log(level, note)
    session = boto3.session.Session()
    client = s3_client(settings, session)
    # Where the log goes when the job cannot even be read: beside the job file.
    log_bucket, log_key = "", ""
    if settings.job.startswith("s3://"):
        log_bucket, job_key = split_s3_url(settings.job)
        log_key = f"{job_key.rpartition('/')[0]}/logs/{owner}/log.txt".lstrip("/")
    worker = None
    try:
        if not settings.job:
            raise Unworkable('no job: the user data names none ({"job": "s3://BUCKET/PREFIX/job.json"}) nor does --job')
        job = read_job_patiently(client, settings)
        worker = Worker(settings, client, job, runner, owner=owner, spot_watch=spot_watch, machine=machine)
        log_bucket, log_key = job.bucket, worker.log_key
        stop_on_signals(worker)
        code = worker.run()
    except Unworkable as error:
        LOG.error("%s; no task claimed", error)
        code = EXIT_UNWORKABLE
    except Exception:  # noqa: BLE001 - logged in full, then the exit action still runs
        LOG.exception("worker stopped by an unexpected error")
        code = EXIT_ERROR
    if log_bucket:
        upload_log(client, log_bucket, log_key, log_file)
    # Stopped by a signal: whoever sent it (a person, the OS shutting down) decides what becomes of the machine.
    if settings.exit_action == "terminate" and not (worker and worker.stop_reason.startswith("stopped by")):
        terminate_self(settings, session)
    return code


if __name__ == "__main__":
    sys.exit(main())
