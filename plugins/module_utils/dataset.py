# -*- coding: utf-8 -*-
# Copyright: cicc.cloud contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The seed's data set of cicc.cloud, built deterministically from a seed.

No numpy, no Ansible: the ``dataset`` module, the tests and the benchmarks import it directly, and it must stay
cheap to import. The list names are the protocol's (task_queue).

Objects, by name (the caller puts its prefix in front):

  in0.dat ... in<N-1>.dat     random inputs of ``input_size`` bytes
  kernel.dat                  random kernel of ``kernel_size`` bytes
  out0.dat ... out<D-1>.dat   the outputs already done: input XOR kernel
  tasklist.txt                in<D>.dat ... in<N-1>.dat, one per line, final newline
  completed.txt               in0.dat ... in<D-1>.dat, one per line, final newline

Tiling rule (the same as ``container/process.py``): the kernel is repeated along the input and
its last repetition is truncated, i.e. ``out[i] = in[i] ^ kernel[i % len(kernel)]``.

Each random object has its own generator seeded from ``(seed, object name)``, so an object's
bytes depend only on the seed, its name and its size: adding inputs or changing ``done`` leaves
the other objects as they were, and the same arguments always give the same bytes.
"""

from __future__ import annotations

import random

from ansible_collections.cicc.cloud.plugins.module_utils.task_queue import COMPLETED, TASKLIST  # noqa: F401 - theirs

KERNEL = "kernel.dat"
DEFAULT_SEED = 121325


def input_name(index: int) -> str:
    return f"in{index}.dat"


def output_name(index: int) -> str:
    return f"out{index}.dat"


def random_bytes(seed: int, name: str, size: int) -> bytes:
    """``size`` bytes that depend only on ``seed`` and ``name``.

    A str seed goes through SHA-512 in ``random.Random``, so the stream is the same in every
    process and on every machine (unlike ``hash()``, which is salted per process).
    """
    return random.Random(f"cicc-dataset:{seed}:{name}").randbytes(size)


def xor_mismatches(read, job, names) -> list[str]:
    """What is wrong with the outputs of the clinic's XOR job: each completed task's output recomputed here as its
    input XOR the job's kernel (its first shared file), independently of the container that made it. ``read(key)``
    gives an object's bytes, or None when there is none."""
    kernel = read(job.shared_key(job.shared[0]))
    if kernel is None:
        return [f"the kernel {job.shared_key(job.shared[0])} is missing"]
    wrong = []
    for name in names:
        output = job.output_key(name, job.output_name(name))
        produced, data = read(output), read(job.input_key(name))
        if produced is None:
            wrong.append(f"{name}: output {output} missing")
        elif data is None:
            wrong.append(f"{name}: input {job.input_key(name)} missing")
        elif produced != xor_tiled(data, kernel):
            wrong.append(f"{name}: output {output} differs from input XOR kernel")
    return wrong


def xor_tiled(data: bytes, kernel: bytes) -> bytes:
    """``data`` XOR ``kernel`` tiled along it (last repetition truncated), without a per-byte loop."""
    if not kernel:
        raise ValueError("the kernel is empty: there is nothing to XOR the input with")
    if not data:
        return b""
    repeats = -(-len(data) // len(kernel))
    tiled = (kernel * repeats)[: len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(tiled, "big")).to_bytes(len(data), "big")


def _lines(names: list[str]) -> bytes:
    return "".join(name + "\n" for name in names).encode("ascii")


def _check_int(name: str, value: object, minimum: int) -> int:
    # bool is an int subclass; True as a size is a mistake, never an intent.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def check_arguments(inputs: int, input_size: int, kernel_size: int, done: int, seed: int) -> None:
    """Raise ValueError naming the first argument that cannot describe a data set."""
    _check_int("inputs", inputs, 1)
    _check_int("input_size", input_size, 1)
    _check_int("kernel_size", kernel_size, 1)
    _check_int("done", done, 0)
    if done > inputs:
        raise ValueError(f"done must be between 0 and inputs ({inputs}), got {done}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")


def object_names(inputs: int = 10, done: int = 3) -> list[str]:
    """The names of the data set's objects, in the order ``build_dataset`` returns them."""
    _check_int("inputs", inputs, 1)
    _check_int("done", done, 0)
    if done > inputs:
        raise ValueError(f"done must be between 0 and inputs ({inputs}), got {done}")
    return (
        [input_name(i) for i in range(inputs)]
        + [KERNEL]
        + [output_name(i) for i in range(done)]
        + [TASKLIST, COMPLETED]
    )


def task_names(inputs: int = 10, done: int = 3) -> tuple[list[str], list[str]]:
    """(pending, completed) input names of the data set: what tasklist.txt and completed.txt list."""
    return [input_name(i) for i in range(done, inputs)], [input_name(i) for i in range(done)]


def build_dataset(
    inputs: int = 10,
    input_size: int = 2_000_000,
    kernel_size: int = 1_000,
    done: int = 3,
    seed: int = DEFAULT_SEED,
) -> dict[str, bytes]:
    """The data set as ``{object name: body}``; inputs first, the two lists last.

    The lists come last so that a caller writing in this order never advertises a task whose
    input is not there yet.
    """
    check_arguments(inputs, input_size, kernel_size, done, seed)
    objects = {input_name(i): random_bytes(seed, input_name(i), input_size) for i in range(inputs)}
    kernel = random_bytes(seed, KERNEL, kernel_size)
    objects[KERNEL] = kernel
    for i in range(done):
        objects[output_name(i)] = xor_tiled(objects[input_name(i)], kernel)
    pending, completed = task_names(inputs, done)
    objects[TASKLIST] = _lines(pending)
    objects[COMPLETED] = _lines(completed)
    return objects
