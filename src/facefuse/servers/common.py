"""Small pieces the model services share: backend status on the wire, waiting on batched futures."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from concurrent.futures import Future, wait
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from facefuse import wire
from facefuse.errors import FacefuseError, InvalidInputError
from facefuse.packs.base import BackendStatus
from facefuse.rpc.deadline import Deadline
from facefuse.servers.threads import add_thread_argument
from facefuse.v1 import common_pb2

if TYPE_CHECKING:
    from facefuse.fusion.visibility import Visibility

T = TypeVar("T")


def backend_info(status: BackendStatus) -> common_pb2.BackendInfo:
    return common_pb2.BackendInfo(
        service=status.service, backend=status.backend, pack=status.pack, placeholder=status.placeholder,
        ready=status.ready, message=status.message, device=status.device, details=dict(status.details),
    )


def visibility_from_message(message: common_pb2.Visibility, num_vertices: int | None = None) -> Visibility:
    """A request's visibility, checked: a fraction per region and, when sent, per vertex (``num_vertices``
    of them when the service knows its mesh), every value finite and in [0, 1]."""
    from facefuse.fusion.visibility import Visibility

    for region, value in message.regions.items():
        if not 0.0 <= value <= 1.0:  # NaN fails this too
            raise InvalidInputError(f"visibility.regions[{region!r}]: {value}; expected 0..1")
    per_vertex = None
    if wire.has(message, "per_vertex"):
        per_vertex = np.asarray(wire.require(message.per_vertex, "visibility.per_vertex", shape=(num_vertices,)),
                                np.float32)
        if per_vertex.size and not (per_vertex.min() >= 0.0 and per_vertex.max() <= 1.0):
            raise InvalidInputError("visibility.per_vertex: values must lie in [0, 1]")
    unknown = tuple(message.unknown)
    if len(unknown) > len(message.regions) or any(name not in message.regions for name in unknown):
        raise InvalidInputError("visibility.unknown: names a region that visibility.regions does not report")
    return Visibility(regions=dict(message.regions), per_vertex=per_vertex, sources=tuple(message.sources),
                      unknown=unknown)


WAIT_POLL_S = 0.05
"""How often a handler waiting on batched work looks whether its caller is still there."""


def wait_all(futures: Sequence[Future[T]], deadline: Deadline) -> list[T]:
    """Results of batched work while the caller waits; when it cancels or its deadline passes, the
    pending work is cancelled (a queued item never runs) and ``CancelledError``/``DeadlineError`` raised."""
    try:
        while True:
            deadline.check("the batched work")
            left = deadline.remaining()
            _, pending = wait(futures, timeout=WAIT_POLL_S if left is None else max(0.0, min(WAIT_POLL_S, left)))
            if not pending:
                return [future.result() for future in futures]
    except FacefuseError:
        for future in futures:
            future.cancel()
        raise


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--assets", help="folder with the official model files (default: $FACEFUSE_ASSETS)")
    parser.add_argument("--pack", default="auto", choices=["auto", "flame", "open"],
                        help="model pack: flame (official files), open (registry models), auto (flame when present)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the networks run")
    parser.add_argument("--max-batch", type=int, default=16, help="largest dynamic batch")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="how long a batch waits to fill once a second request is queued (a lone request "
                             "runs at once)")
    add_thread_argument(parser)
