"""Torch's thread count per service, so services that share a host do not oversubscribe its cores.

Left alone, every torch process starts one intra-op thread per core: mica and ofer on one 2-core host
then run four busy threads on two cores, and spinning, preempted threads cost CPU for nothing (one
thread per service cut CPU per face from 4.4-5.4 s to 2.6-3.5 s on such a host, issue 18). Each service
takes ``--torch-threads`` (default ``$FACEFUSE_TORCH_THREADS``, else ``auto``).
"""

from __future__ import annotations

import argparse
import contextlib
import os

THREADS_ENV = "FACEFUSE_TORCH_THREADS"
MAX_THREADS = 256
CO_LOCATED_MODEL_SERVICES = 2
"""mica and ofer: the two services that run networks, and what ``auto`` assumes shares the host."""


def usable_cpus() -> int:
    """The CPUs this process may run on (a container's cpuset, taskset), not the host's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def parse_torch_threads(text: str) -> int:
    """``auto`` or a whole number 1..256 -> the thread count (``auto``: the usable CPUs shared evenly
    between the two model services, at least one). argparse turns the ValueError into a usage error."""
    value = text.strip().lower()
    if value == "auto":
        return max(1, usable_cpus() // CO_LOCATED_MODEL_SERVICES)
    if not value.isascii() or not value.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'auto' or a whole number 1..{MAX_THREADS}")
    threads = int(value)
    if not 1 <= threads <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"{threads} threads; expected 1..{MAX_THREADS} or 'auto'")
    return threads


def add_thread_argument(parser: argparse.ArgumentParser) -> None:
    default = os.environ.get(THREADS_ENV) or "auto"
    parser.add_argument(
        "--torch-threads", type=parse_torch_threads, default=default,
        help=f"torch intra-op threads of this service: 'auto' (usable CPUs / {CO_LOCATED_MODEL_SERVICES}, at least "
             f"1) or 1..{MAX_THREADS}; default ${THREADS_ENV} or auto (docs/scaling.md#threads)",
    )


def apply_torch_threads(threads: int) -> None:
    """Set torch's intra-op threads (and one inter-op thread: the services run one model call at a time per
    batcher, so inter-op parallelism only adds threads). Called before any model loads."""
    import torch

    torch.set_num_threads(threads)
    # RuntimeError: fixed once parallel work ran in this process (a test calling build twice)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
