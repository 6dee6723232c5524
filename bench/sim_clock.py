"""A virtual clock and a deterministic scheduler for the simulator (bench/bench_sim.py).

Every thread of the simulated workers is a real thread, but only the one holding the baton runs: a
thread gives it up whenever it would wait (a sleep, an S3 request's latency, an Event, a join, a busy
Lock), and the baton goes to the thread due first on the virtual clock (ties in the order they became
due), which then jumps to that thread's wake-up time. For a given seed a run is the same every time, and
an hour of simulated work takes as long as its Python code does.

``sim_time`` and ``sim_threading`` stand in for the ``time`` and ``threading`` modules inside the code
under test: ``load_under_clock`` executes task_queue.py and cicc_worker.py with them in sys.modules, so
that everything those files bind at import (``threading.Thread`` as a base class, ``threading.Lock`` and
``time.monotonic`` as dataclass default factories) is the simulated one.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import sys
import threading
import time
import traceback
import types
from collections import deque

_real_thread = threading.Thread
_real_semaphore = threading.Semaphore
_real_event = threading.Event
_real_get_ident = threading.get_ident
# 2026-01-01T00:00:00Z: what time.time() says at virtual second 0.
EPOCH = 1_767_225_600


class Deadlock(RuntimeError):
    """Every simulated thread waits for another one: nothing can ever run again."""


class _Task:
    __slots__ = ("name", "turn", "done", "generation", "joiners", "thread")

    def __init__(self, name: str, thread) -> None:
        self.name, self.thread = name, thread
        self.turn = _real_semaphore(0)
        self.done = False
        self.generation = 0  # wake-ups queued before the latest one are stale
        self.joiners: list[_Task] = []


class Scheduler:
    def __init__(self) -> None:
        self.now = 0.0
        self._due: list = []  # (time, sequence, generation, task)
        self._sequence = itertools.count()
        self._by_ident: dict[int, _Task] = {}
        self.current: _Task | None = None
        self.errors: list[str] = []
        self._finished = _real_event()
        self.switches = 0
        self._root: _Task | None = None

    # --- the clock, as the code under test sees it

    def time(self) -> float:
        return EPOCH + self.now

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self._wake(self.current, self.now + max(0.0, seconds))
        self._yield()

    # sim_s3.SimClient's clock
    def pause(self, seconds: float) -> None:
        self.sleep(seconds)

    # --- threads

    def _me(self) -> _Task:
        task = self._by_ident.get(_real_get_ident())
        if task is None:
            raise RuntimeError("a simulated primitive was used outside the simulation")
        return task

    def spawn(self, body, name: str, thread=None) -> _Task:
        task = _Task(name, thread)

        def run() -> None:
            task.turn.acquire()
            self._by_ident[_real_get_ident()] = task
            try:
                body()
            except BaseException:  # noqa: BLE001 - a simulated thread's death is a finding, not a crash
                self.errors.append(f"thread {name} died:\n{traceback.format_exc()}")
            finally:
                task.done = True
                if task is self._root:
                    self._finished.set()
                for joiner in task.joiners:
                    self._wake(joiner, self.now)
                task.joiners.clear()
                del self._by_ident[_real_get_ident()]
                self._yield(exiting=True)

        _real_thread(target=run, name=f"sim-{name}", daemon=True).start()
        self._wake(task, self.now)
        return task

    def _wake(self, task: _Task, at: float) -> None:
        task.generation += 1
        heapq.heappush(self._due, (at, next(self._sequence), task.generation, task))

    def _yield(self, exiting: bool = False) -> None:
        """Hand the baton to the thread due first; return when it comes back to this one."""
        me = self.current
        while self._due:
            at, _seq, generation, task = heapq.heappop(self._due)
            if generation == task.generation and not task.done:
                break
        else:
            if not exiting:
                self.errors.append(f"deadlock at {self.now:.3f} s: {me.name} waits and no thread is due")
                self._finished.set()
                raise Deadlock(self.errors[-1])
            self._finished.set()
            return
        self.now = max(self.now, at)
        self.current = task
        if task is me:
            return
        self.switches += 1
        task.turn.release()
        if not exiting:
            me.turn.acquire()

    def park(self) -> None:
        """Wait until some other thread wakes this one (join, Event, Lock)."""
        self._yield()

    def join(self, task: _Task) -> None:
        if not task.done:
            task.joiners.append(self._me())
            self.park()

    def run(self, main, name: str = "main") -> None:
        """Run ``main()`` as the first simulated thread and return when it has; raises if a thread died
        or the simulation deadlocked."""
        self._finished.clear()
        root = self._root = self.spawn(main, name)
        at, _seq, _generation, task = heapq.heappop(self._due)
        self.current = task
        task.turn.release()
        self._finished.wait()
        if not root.done and not self.errors:
            self.errors.append("the simulation stopped before its main thread ended")


SCHEDULER: Scheduler | None = None


def _scheduler() -> Scheduler:
    return SCHEDULER


# --- the modules the code under test imports --------------------------------------------------------


class Thread:
    """threading.Thread on the virtual clock (subclassed by the worker's Heartbeat and Prefetch)."""

    _numbers = itertools.count(1)

    def __init__(self, group=None, target=None, name=None, args=(), kwargs=None, *, daemon=None) -> None:
        self._target, self._args, self._kwargs = target, args, kwargs or {}
        self.name = name or f"Thread-{next(self._numbers)}"
        self.daemon = bool(daemon)
        self._task: _Task | None = None

    def start(self) -> None:
        self._task = _scheduler().spawn(self.run, self.name, self)

    def run(self) -> None:
        if self._target is not None:
            self._target(*self._args, **self._kwargs)

    def is_alive(self) -> bool:
        return self._task is not None and not self._task.done

    def join(self, timeout: float | None = None) -> None:
        if self._task is not None:
            _scheduler().join(self._task)

    @property
    def ident(self) -> int | None:
        return id(self._task) if self._task else None


class Event:
    def __init__(self) -> None:
        self._flag = False
        self._waiters: list[_Task] = []

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        self._flag = True
        scheduler = _scheduler()
        for task in self._waiters:
            scheduler._wake(task, scheduler.now)
        self._waiters.clear()

    def clear(self) -> None:
        self._flag = False

    def wait(self, timeout: float | None = None) -> bool:
        if self._flag:
            return True
        scheduler = _scheduler()
        me = scheduler._me()
        self._waiters.append(me)
        if timeout is not None:
            scheduler._wake(me, scheduler.now + max(0.0, timeout))
        scheduler.park()
        if me in self._waiters:  # the timeout came first
            self._waiters.remove(me)
        return self._flag


class Lock:
    """A lock handed over in the order its waiters came (a waiter parks; it never spins)."""

    def __init__(self) -> None:
        self._held = False
        self._waiters: deque[_Task] = deque()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if not self._held:
            self._held = True
            return True
        if not blocking:
            return False
        scheduler = _scheduler()
        self._waiters.append(scheduler._me())
        scheduler.park()
        return True  # release() handed it to this thread

    def release(self) -> None:
        if self._waiters:
            scheduler = _scheduler()
            scheduler._wake(self._waiters.popleft(), scheduler.now)  # still held: now by the waiter
        else:
            self._held = False

    def locked(self) -> bool:
        return self._held

    __enter__ = acquire

    def __exit__(self, *exc) -> None:
        self.release()


class _MainThread:
    name = "MainThread"


def current_thread():
    task = _scheduler()._by_ident.get(_real_get_ident()) if _scheduler() else None
    return task.thread if task and task.thread else _MainThread()


def _module(name: str, real: types.ModuleType, **members) -> types.ModuleType:
    """A module that answers ``members`` and forwards every other name to ``real``."""
    module = types.ModuleType(name)
    module.__dict__.update(members)
    module.__getattr__ = lambda attribute: getattr(real, attribute)
    return module


sim_time = _module(
    "time",
    time,
    time=lambda: _scheduler().time(),
    monotonic=lambda: _scheduler().monotonic(),
    sleep=lambda seconds: _scheduler().sleep(seconds),
)
sim_threading = _module("threading", threading, Thread=Thread, Event=Event, Lock=Lock, current_thread=current_thread)


def new_scheduler() -> Scheduler:
    global SCHEDULER
    SCHEDULER = Scheduler()
    return SCHEDULER


@contextlib.contextmanager
def simulated_modules():
    """sys.modules' ``time`` and ``threading`` are the simulated ones inside the block: only the modules
    first executed there bind them (import everything else they need before)."""
    saved = sys.modules["time"], sys.modules["threading"]
    sys.modules["time"], sys.modules["threading"] = sim_time, sim_threading
    try:
        yield
    finally:
        sys.modules["time"], sys.modules["threading"] = saved
