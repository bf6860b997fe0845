"""The ofer service: IdGen samples FLAME shapes, IdRank scores candidates; thin over the core library."""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import grpc
import numpy as np

from facefuse import wire
from facefuse.errors import InvalidInputError, LimitExceededError
from facefuse.packs.base import GenerativeBackend, StopCheck
from facefuse.rpc.deadline import Deadline
from facefuse.rpc.logs import log_event
from facefuse.rpc.metrics import queued
from facefuse.servers.base import run_cli
from facefuse.servers.batching import DynamicBatcher
from facefuse.servers.common import (
    add_model_arguments,
    backend_info,
    visibility_from_message,
    wait_all,
)
from facefuse.v1 import common_pb2, ofer_pb2, ofer_pb2_grpc

if TYPE_CHECKING:
    from facefuse.fusion.visibility import Visibility
    from facefuse.packs.flame import SampleJob

SERVICE_NAME = "facefuse.v1.OferService"
TURN_POLL_S = 0.05
"""How often a call waiting for the model looks whether its caller is still there."""
MAX_SAMPLES = 1000
MAX_CANDIDATES = MAX_SAMPLES + 1  # the samples plus MICA's shape ("pool")
MAX_STEPS = 1000  # IdGen's schedule length: more DDIM steps than that do not exist
MODES = ("fast", "official")


class OferServicer(ofer_pb2_grpc.OferServiceServicer):
    """Runs one model call at a time (torch already uses every core), or, with ``max_batch`` > 1 and a
    backend that has ``sample_batch``, batches concurrent plain Sample requests across faces. Batching is
    off by default: a batch's composition changes float rounding, and a seed should give the same samples
    whoever else is asking (see ``OferBackend.sample_batch``)."""

    def __init__(self, backend: GenerativeBackend, *, max_batch: int = 1, batch_wait_s: float = 0.005) -> None:
        self.backend = backend
        self._lock = threading.Lock()
        self.batcher = None
        if max_batch > 1 and hasattr(backend, "sample_batch"):
            batched = backend.sample_batch

            def run(jobs: Sequence[SampleJob], stop_check: StopCheck) -> list[np.ndarray]:
                with self._model_turn(stop_check):
                    return batched(jobs, stop_check=stop_check)

            self.batcher = DynamicBatcher(run, max_batch=max_batch, max_wait_s=batch_wait_s, name="ofer-batcher")

    def _model_turn(self, stop_check: StopCheck) -> AbstractContextManager[None]:
        """The model, one call at a time. A caller that goes away while waiting for its turn never runs
        (and leaves the queue-depth metric), and the model's work checks ``stop_check`` as it goes, so
        an abandoned call frees the model at once."""
        return queued(self._lock, "ofer-model", stop_check, TURN_POLL_S)

    def Sample(self, request: ofer_pb2.SampleRequest, context: grpc.ServicerContext) -> Iterator[ofer_pb2.SampleChunk]:
        deadline = Deadline.from_context(context)
        shapes = self._sample(request, deadline)
        chunk = request.chunk_size or len(shapes)
        for offset in range(0, len(shapes), chunk):
            if not context.is_active():
                return
            yield ofer_pb2.SampleChunk(
                offset=offset, shapes=wire.from_numpy(shapes[offset : offset + chunk]), total=len(shapes)
            )
        log_event("sample", samples=len(shapes), mode=request.mode or "fast")

    def _sample(self, request: ofer_pb2.SampleRequest, deadline: Deadline) -> np.ndarray:
        """Check every field of the request, then sample (stopping when the caller goes away)."""
        face = wire.aligned_face_from_message(request.face)
        count = request.num_samples or 10
        if count < 0:
            raise InvalidInputError(f"num_samples {count}; expected 1..{MAX_SAMPLES} (0 = 10)")
        if count > MAX_SAMPLES:
            raise LimitExceededError(f"num_samples {count}; allowed 1..{MAX_SAMPLES}")
        if not 0 <= request.steps <= MAX_STEPS:
            raise (LimitExceededError if request.steps > MAX_STEPS else InvalidInputError)(
                f"steps {request.steps}; expected 0..{MAX_STEPS} (0 = the sampler's default)")
        if request.chunk_size < 0:
            raise InvalidInputError(f"chunk_size {request.chunk_size}; expected >= 0 (0 = all samples in one chunk)")
        mode = request.mode or "fast"
        if mode not in MODES:
            raise InvalidInputError(f"mode {mode!r}; expected one of {MODES}")
        start = (
            wire.require(request.start_shape, "start_shape", shape=(None,))
            if wire.has(request, "start_shape")
            else None
        )
        guide = (
            wire.require(request.guide_shape, "guide_shape", shape=(None,))
            if wire.has(request, "guide_shape")
            else None
        )
        if not 0 <= request.start_t0 <= 999:
            raise InvalidInputError(f"start_t0 {request.start_t0}; expected 0..999")
        if not 0.0 <= request.guide_strength <= 1.0:  # NaN fails this too
            raise InvalidInputError(f"guide_strength {request.guide_strength}; expected 0..1")
        visibility = _visibility(request)
        if self.batcher is not None and start is None and (guide is None or request.guide_strength == 0):
            from facefuse.packs.flame import SampleJob

            job = SampleJob(face, count, mode, request.steps, request.seed)
            shapes = wait_all([self.batcher.submit(job, deadline)], deadline)[0]
        else:
            with self._model_turn(deadline.check):
                shapes = self.backend.sample(face, count, mode=mode, steps=request.steps, seed=request.seed,
                                             start_shape=start, start_t0=request.start_t0,
                                             guide_shape=guide, guide_strength=request.guide_strength,
                                             visibility=visibility, stop_check=deadline.check)
        return np.asarray(shapes, dtype=np.float32)

    def Rank(self, request: ofer_pb2.RankRequest, context: grpc.ServicerContext) -> ofer_pb2.RankResponse:
        face = wire.aligned_face_from_message(request.face)
        candidates = wire.require(request.candidates, "candidates", shape=(None, None))  # K checked by the backend
        if len(candidates) == 0:
            raise InvalidInputError("candidates is empty")
        if len(candidates) > MAX_CANDIDATES:
            raise LimitExceededError(f"{len(candidates)} candidates; the limit is {MAX_CANDIDATES}")
        visibility = _visibility(request)
        deadline = Deadline.from_context(context)
        with self._model_turn(deadline.check):
            scores = self.backend.rank(face, np.asarray(candidates, dtype=np.float32), visibility=visibility,
                                       stop_check=deadline.check)
        return ofer_pb2.RankResponse(scores=wire.from_numpy(np.asarray(scores, dtype=np.float32)))

    def Info(self, request: common_pb2.InfoRequest, context: grpc.ServicerContext) -> common_pb2.BackendInfo:
        return backend_info(self.backend.status)


def _visibility(request: ofer_pb2.SampleRequest | ofer_pb2.RankRequest) -> Visibility | None:
    """The face's visibility (regions, optionally per vertex) when the gateway sent one."""
    return visibility_from_message(request.visibility) if request.HasField("visibility") else None


def build(args: argparse.Namespace) -> tuple[Callable[[grpc.Server], None], Sequence[str], dict[str, bool]]:
    from facefuse.packs.loading import load_generative_backend

    backend = load_generative_backend(args.pack, args.assets, args.device)
    servicer = OferServicer(backend, max_batch=args.max_batch, batch_wait_s=args.batch_wait_ms / 1000)
    return (lambda server: ofer_pb2_grpc.add_OferServiceServicer_to_server(servicer, server),
            [SERVICE_NAME], {SERVICE_NAME: backend.status.ready})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.set_defaults(max_batch=1)  # batching across faces is opt-in here (see OferServicer)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("facefuse-ofer", "OFER service: IdGen shape samples and IdRank scores", add_arguments, build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
