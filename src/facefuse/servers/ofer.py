"""The ofer service: IdGen samples FLAME shapes, IdRank scores candidates; thin over the core library."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import grpc
import numpy as np

from facefuse import wire
from facefuse.errors import CancelledError, DeadlineError, InvalidInputError, LimitExceededError
from facefuse.face.types import AlignedFace
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
PREFETCH_ENTRIES = 4
"""Rank contexts kept (in flight or done) for faces whose Rank has not come yet; the oldest is dropped."""
PREFETCH_WAITING = 1
"""Speculative context jobs waiting for the prefetch thread; a newer face's job replaces the oldest."""
PREFETCH_NICE = 10
"""How much lower than the service's other threads the prefetch thread runs (Linux nice increment)."""


def _lower_thread_priority() -> None:
    """Make the calling thread (only it) yield the CPU to the service's lanes and to co-located services.

    The prefetch is speculative work for later: when a face arrives at an idle service, MICA's ArcFace
    (another process) and this face's sampler run first, and the prefetch takes whatever core they leave
    (on Linux a thread's id is a valid ``setpriority`` target; elsewhere the thread keeps its priority)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError):  # not permitted here: the prefetch still works, only without yielding
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PREFETCH_NICE)


class RankContextPrefetch:
    """IdRank's context of a face, computed on one background thread while the face's Sample runs.

    The context (ArcFace + FaRL on the face's image, ~1 s of CPU on the flame pack) depends only on the
    face's image tensors, not on the samples, and the gateway calls Rank right after Sample: computing it
    during the sampler puts a second core to work that would otherwise idle. The Rank call takes the entry
    for its face (keyed by a hash of the image tensors' bytes, shapes and dtypes) and uses the same tensor
    the Rank call would have computed, with the same call, so the scores are bit for bit the same.

    Bounded: one worker thread, at most ``waiting`` jobs queued (a newer face replaces the oldest queued
    one), at most ``entries`` faces kept; a job stops at its Sample call's deadline, when its Sample
    fails or its caller goes away (``discard``), or when dropped; a Rank that finds its job still queued
    cancels it and computes the context itself, and a job that failed leaves Rank to compute (and report)
    it as before.
    """

    def __init__(self, compute: Callable[[AlignedFace, StopCheck], object], *,
                 entries: int = PREFETCH_ENTRIES, waiting: int = PREFETCH_WAITING) -> None:
        if entries < 1 or waiting < 1:
            raise ValueError(f"entries {entries} and waiting {waiting} must be at least 1")
        self._compute = compute
        self._entries_limit = entries
        self._waiting_limit = waiting
        self._entries: OrderedDict[bytes, _PrefetchEntry] = OrderedDict()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ofer-rank-prefetch",
                                            initializer=_lower_thread_priority)

    @staticmethod
    def key(face: AlignedFace) -> bytes | None:
        """What identifies a face's context: its ArcFace blob and FaRL input (None: no FaRL input sent)."""
        if face.farl_input is None:
            return None
        digest = hashlib.blake2b(digest_size=32)
        for array in (face.arcface_blob, face.farl_input):
            array = np.ascontiguousarray(array)
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            digest.update(array.tobytes())
        return digest.digest()

    def start(self, face: AlignedFace, deadline_at: float | None) -> None:
        """Queue the context of ``face`` (a face already kept is only refreshed). ``deadline_at``: the
        Sample call's deadline on ``time.monotonic()``'s clock; the job stops there (None: no deadline)."""
        key = self.key(face)
        if key is None:
            return
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
            waiting = [k for k, e in self._entries.items() if not e.future.running() and not e.future.done()]
            while len(waiting) >= self._waiting_limit:
                self._entries.pop(waiting.pop(0)).drop()
            entry = _PrefetchEntry(deadline_at)
            entry.future = self._executor.submit(self._run, entry, face)
            self._entries[key] = entry
            while len(self._entries) > self._entries_limit:
                self._entries.popitem(last=False)[1].drop()

    def _run(self, entry: _PrefetchEntry, face: AlignedFace) -> object:
        return self._compute(face, entry.check)

    def take(self, face: AlignedFace, stop_check: StopCheck) -> object | None:
        """The context of ``face`` once its job finishes, or None (nothing kept, still queued, or failed):
        the caller then computes it itself. Waits outside the model turn, checking ``stop_check``."""
        key = self.key(face)
        if key is None:
            return None
        with self._lock:
            entry = self._entries.pop(key, None)
        if entry is None:
            return None
        if entry.future.cancel():  # still queued: computing it in the Rank call is sooner
            return None
        while not wait([entry.future], timeout=TURN_POLL_S).done:
            try:
                stop_check()
            except BaseException:
                entry.drop()
                raise
        if entry.future.cancelled() or entry.future.exception() is not None:
            return None  # the job failed or was dropped: Rank computes (and reports) it itself
        return entry.future.result()

    def discard(self, face: AlignedFace) -> None:
        """The face's Sample failed or its caller went away: stop its job, forget its entry."""
        key = self.key(face)
        if key is None:
            return
        with self._lock:
            entry = self._entries.pop(key, None)
        if entry is not None:
            entry.drop()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def close(self) -> None:
        with self._lock:
            entries, self._entries = list(self._entries.values()), OrderedDict()
        for entry in entries:
            entry.drop()
        self._executor.shutdown(wait=False, cancel_futures=True)


class _PrefetchEntry:
    """One speculative context job: its future and what stops it."""

    def __init__(self, deadline_at: float | None) -> None:
        self.deadline_at = deadline_at
        self.dropped = threading.Event()
        self.future: Future[object] = Future()

    def drop(self) -> None:
        self.dropped.set()
        self.future.cancel()

    def check(self) -> None:
        if self.dropped.is_set():
            raise CancelledError("the speculative IdRank context was dropped")
        if self.deadline_at is not None and time.monotonic() > self.deadline_at:
            raise DeadlineError("deadline exceeded during the speculative IdRank context")


class OferServicer(ofer_pb2_grpc.OferServiceServicer):
    """Runs one Sample and one Rank at a time: in two lanes when the backend allows it
    (``rank_lane``, ``sample_and_rank_concurrently``), so one face's Rank runs on a second core while the next
    face samples; else one model call at a time. With ``max_batch`` > 1 and a backend that has
    ``sample_batch``, it batches concurrent plain Sample requests across faces. Batching is off by default:
    a batch's composition changes float rounding, and a seed should give the same samples whoever else is
    asking (see ``OferBackend.sample_batch``). The lanes change no number: each call runs the same
    operations with the same thread count whatever the other lane does."""

    def __init__(self, backend: GenerativeBackend, *, max_batch: int = 1, batch_wait_s: float = 0.005,
                 rank_prefetch: bool = True, rank_lane: bool = True) -> None:
        self.backend = backend
        self._lock = threading.Lock()
        concurrent = rank_lane and bool(getattr(backend, "sample_and_rank_concurrently", False))
        self._rank_lock = threading.Lock() if concurrent else self._lock
        self.prefetch: RankContextPrefetch | None = None
        rank_context = getattr(backend, "rank_context", None)
        if rank_prefetch and rank_context is not None:
            self.prefetch = RankContextPrefetch(lambda face, check: rank_context(face, stop_check=check))
        self.batcher = None
        if max_batch > 1 and hasattr(backend, "sample_batch"):
            batched = backend.sample_batch

            def run(jobs: Sequence[SampleJob], stop_check: StopCheck) -> list[np.ndarray]:
                with self._model_turn(stop_check):
                    return batched(jobs, stop_check=stop_check)

            self.batcher = DynamicBatcher(run, max_batch=max_batch, max_wait_s=batch_wait_s, name="ofer-batcher")

    def _model_turn(self, stop_check: StopCheck, *, rank: bool = False) -> AbstractContextManager[None]:
        """The model's sample lane (or, ``rank``, its rank lane: the same lock unless the lanes are split),
        one call at a time each. A caller that goes away while waiting for its turn never runs (and leaves
        the queue-depth metric), and the model's work checks ``stop_check`` as it goes, so an abandoned
        call frees the model at once."""
        return queued(self._rank_lock if rank else self._lock, "ofer-model", stop_check, TURN_POLL_S)

    def Sample(self, request: ofer_pb2.SampleRequest, context: grpc.ServicerContext) -> Iterator[ofer_pb2.SampleChunk]:
        deadline = Deadline.from_context(context)
        face = wire.aligned_face_from_message(request.face)
        try:
            shapes = self._sample(request, face, deadline)
        except BaseException:
            if self.prefetch is not None:
                self.prefetch.discard(face)
            raise
        chunk = request.chunk_size or len(shapes)
        for offset in range(0, len(shapes), chunk):
            if not context.is_active():
                if self.prefetch is not None:
                    self.prefetch.discard(face)
                return
            yield ofer_pb2.SampleChunk(
                offset=offset, shapes=wire.from_numpy(shapes[offset : offset + chunk]), total=len(shapes)
            )
        log_event("sample", samples=len(shapes), mode=request.mode or "fast")

    def _sample(self, request: ofer_pb2.SampleRequest, face: AlignedFace, deadline: Deadline) -> np.ndarray:
        """Check every field of the request, then sample (stopping when the caller goes away). A face sent
        with its FaRL input gets its Rank context computed meanwhile (``RankContextPrefetch``)."""
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
        if self.prefetch is not None and not self._lock.locked() and not self._rank_lock.locked():
            # Only into an idle service: with other faces sampling or ranking, the cores are busy already,
            # this face's Rank computes its context in its lane, and a third thread would slow the lanes.
            self.prefetch.start(face, deadline.at)
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
        # The context its Sample started, waited for before the model turn so other calls use the model meanwhile.
        prefetched = self.prefetch.take(face, deadline.check) if self.prefetch is not None else None
        extra = {} if prefetched is None else {"context": prefetched}
        with self._model_turn(deadline.check, rank=True):
            scores = self.backend.rank(face, np.asarray(candidates, dtype=np.float32), visibility=visibility,
                                       stop_check=deadline.check, **extra)
        return ofer_pb2.RankResponse(scores=wire.from_numpy(np.asarray(scores, dtype=np.float32)))

    def Info(self, request: common_pb2.InfoRequest, context: grpc.ServicerContext) -> common_pb2.BackendInfo:
        return backend_info(self.backend.status)


def _visibility(request: ofer_pb2.SampleRequest | ofer_pb2.RankRequest) -> Visibility | None:
    """The face's visibility (regions, optionally per vertex) when the gateway sent one."""
    return visibility_from_message(request.visibility) if request.HasField("visibility") else None


def build(args: argparse.Namespace) -> tuple[Callable[[grpc.Server], None], Sequence[str], dict[str, bool]]:
    from facefuse.packs.loading import load_generative_backend

    backend = load_generative_backend(args.pack, args.assets, args.device)
    servicer = OferServicer(backend, max_batch=args.max_batch, batch_wait_s=args.batch_wait_ms / 1000,
                            rank_prefetch=args.rank_prefetch == "on", rank_lane=args.rank_lane == "on")
    return (lambda server: ofer_pb2_grpc.add_OferServiceServicer_to_server(servicer, server),
            [SERVICE_NAME], {SERVICE_NAME: backend.status.ready})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.set_defaults(max_batch=1)  # batching across faces is opt-in here (see OferServicer)
    parser.add_argument("--rank-prefetch", default="on", choices=["on", "off"],
                        help="compute IdRank's context of a face on a second thread while its Sample runs, when the "
                             "Sample carries the FaRL input (docs/performance.md#rank-prefetch)")
    parser.add_argument("--rank-lane", default="on", choices=["on", "off"],
                        help="run Rank calls in a lane of their own, beside Sample calls, where the pack allows it "
                             "(flame): one face ranks while the next samples (docs/performance.md#rank-lane)")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("facefuse-ofer", "OFER service: IdGen shape samples and IdRank scores", add_arguments, build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
