"""The gateway: images stream in, one result per face streams out; thin over ``pipeline.orchestration``.

Each ``Process`` stream has a reader thread that assembles chunked images and hands each complete
image to one image pool shared by all streams; results are yielded in completion order. Limits, each a
flag (docs/services.md): concurrent streams (RESOURCE_EXHAUSTED beyond), images in flight per stream,
an idle timeout, bytes buffered per stream for images still missing their last chunk, bytes per image
(RESOURCE_EXHAUSTED for that image, the stream goes on) and pixels (decompression bombs refused).

Back-pressure: an image holds one of its stream's in-flight slots until the stream has handed all of
its results to gRPC, so a client that stops reading stops the reader (and, through HTTP/2 flow
control, its own sending) after a bounded number of results; the shared pool's threads never wait on
a slow client, so one such client cannot starve the other streams.
"""

from __future__ import annotations

import argparse
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from facefuse import wire
from facefuse.errors import DeadlineError, FacefuseError, InvalidInputError, LimitExceededError
from facefuse.face.types import det_thresh_argument
from facefuse.io.images import DEFAULT_MAX_DECODE_BYTES
from facefuse.pipeline.orchestration import FacePipeline, MeshClients, error_result
from facefuse.rpc.deadline import Deadline
from facefuse.rpc.logs import current_request_id, log_event
from facefuse.rpc.security import ClientTls
from facefuse.servers.base import Readiness, run_cli
from facefuse.servers.readiness import BackendReadiness
from facefuse.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

SERVICE_NAME = "facefuse.v1.Gateway"
DEFAULT_MAX_IMAGE_MB = 50
DEFAULT_MAX_STREAMS = 64
DEFAULT_STREAM_IN_FLIGHT = 4
DEFAULT_IMAGE_WORKERS = 16
DEFAULT_FACES_IN_FLIGHT = 16
"""Faces at the model services at once (all streams): enough for the ofer and mica batchers to fill
batches from concurrent clients; on a CPU the extra faces wait in the services' queues, not here."""
DEFAULT_STREAM_IDLE_S = 60.0
DEFAULT_STREAM_BUFFER_MB = 64
UNARY_RESERVE = 8
"""RPC threads beyond one per stream: health, reflection and ``Info`` always find one under full load."""
PENDING_IMAGE_OVERHEAD = 1024
"""Bytes charged to the stream buffer per unfinished image, so a flood of tiny partial images counts too."""
POLL_S = 0.25
"""How often a waiting stream looks at its deadline, its caller and its idle clock."""

MAX_IMAGE_ID_CHARS = 1024  # echoed in every result of the image: a name, not a payload
_READER_DONE = object()
_IMAGE_DONE = object()


@dataclass(frozen=True)
class StreamLimits:
    """What one ``Process`` stream, and all of them together, may hold."""

    max_streams: int = DEFAULT_MAX_STREAMS
    in_flight: int = DEFAULT_STREAM_IN_FLIGHT
    idle_s: float = DEFAULT_STREAM_IDLE_S
    buffer_bytes: int = DEFAULT_STREAM_BUFFER_MB << 20
    max_image_bytes: int = DEFAULT_MAX_IMAGE_MB << 20

    def __post_init__(self) -> None:
        if (
            self.max_streams < 1
            or self.in_flight < 1
            or self.idle_s <= 0
            or self.buffer_bytes < 1
            or self.max_image_bytes < 1
        ):
            raise InvalidInputError(f"stream limits must be positive: {self}")


@dataclass
class _PendingImage:
    options: gateway_pb2.ProcessOptions
    parts: list[bytes] = field(default_factory=list)
    size: int = 0
    charged: int = 0
    mask: common_pb2.Tensor | None = None
    refused: FacefuseError | None = None


class _Once:
    """Calls ``fn`` the first time it is called, never again (a stream slot is freed exactly once)."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self._fn = fn
        self._lock = threading.Lock()
        self._done = False

    def __call__(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self._fn()


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, pipeline: FacePipeline, *, limits: StreamLimits | None = None,
                 image_workers: int = DEFAULT_IMAGE_WORKERS, front_end_name: str = "") -> None:
        self.pipeline = pipeline
        self.limits = limits or StreamLimits()
        self.front_end_name = front_end_name
        # One pool for every stream: 64 streams share these threads instead of starting 4 each.
        self._images = ThreadPoolExecutor(max_workers=image_workers, thread_name_prefix="image")
        self._streams = threading.BoundedSemaphore(self.limits.max_streams)

    def close(self) -> None:
        self._images.shutdown(wait=False, cancel_futures=True)

    def Process(self, request_iterator: Iterator[gateway_pb2.ImageChunk],
                context: grpc.ServicerContext) -> Iterator[gateway_pb2.FaceResult]:
        if not self._streams.acquire(blocking=False):
            raise LimitExceededError(
                f"the gateway is at its limit of {self.limits.max_streams} concurrent Process streams "
                "(gateway flag --max-streams); retry later")
        release = _Once(self._streams.release)
        context.add_callback(release)  # the slot is freed even if gRPC drops this generator without closing it
        try:
            yield from self._stream(request_iterator, context)
        finally:
            release()

    def _stream(self, request_iterator: Iterator[gateway_pb2.ImageChunk],
                context: grpc.ServicerContext) -> Iterator[gateway_pb2.FaceResult]:
        limits = self.limits
        out: queue.Queue[object] = queue.Queue()  # bounded by the in-flight slots, see the module docstring
        slots = threading.Semaphore(limits.in_flight)
        deadline = Deadline.from_context(context)
        # The stream's request id, set by the interceptor in this thread only: the image threads set it too.
        request_id = current_request_id.get()
        last_activity = [time.monotonic()]
        in_flight = [0]
        in_flight_lock = threading.Lock()
        reader_error: list[BaseException] = []

        def run_image(image_id: str, pending: _PendingImage) -> None:
            token = current_request_id.set(request_id)
            try:
                if not deadline.alive:
                    return
                if pending.refused is not None:
                    out.put(error_result(image_id, pending.refused))
                    return
                mask = wire.to_numpy(pending.mask, "mask") if pending.mask is not None else None
                for result in self.pipeline.process_image(
                    image_id, b"".join(pending.parts), pending.options, mask, deadline
                ):
                    if not deadline.alive:
                        return
                    out.put(result)
            except Exception as exc:
                out.put(error_result(image_id, exc))
            finally:
                out.put(_IMAGE_DONE)
                current_request_id.reset(token)

        def take_slot() -> bool:
            while not slots.acquire(timeout=POLL_S):
                if not deadline.alive:
                    return False
            return True

        def read() -> None:
            pending: dict[str, _PendingImage] = {}
            buffered = 0
            try:
                for chunk in request_iterator:
                    last_activity[0] = time.monotonic()
                    if not deadline.alive:
                        break
                    if not chunk.image_id:
                        out.put(error_result("", InvalidInputError("ImageChunk.image_id is empty")))
                        continue
                    if len(chunk.image_id) > MAX_IMAGE_ID_CHARS:
                        out.put(error_result(chunk.image_id[:64], InvalidInputError(
                            f"ImageChunk.image_id has {len(chunk.image_id)} characters; at most {MAX_IMAGE_ID_CHARS}")))
                        continue
                    item = pending.get(chunk.image_id)
                    if item is None:
                        item = pending[chunk.image_id] = _PendingImage(options=chunk.options)
                        item.charged = PENDING_IMAGE_OVERHEAD + chunk.options.ByteSize()
                        buffered += item.charged
                    if chunk.HasField("mask"):
                        size = chunk.mask.ByteSize()
                        old = item.mask.ByteSize() if item.mask is not None else 0
                        item.mask = chunk.mask
                        item.charged += size - old
                        buffered += size - old
                    if item.refused is None:
                        item.size += len(chunk.data)
                        if item.size > limits.max_image_bytes:
                            item.refused = LimitExceededError(
                                f"image is over the gateway's limit of {limits.max_image_bytes >> 20} MiB "
                                "(--max-image-mb)"
                            )
                            freed = sum(len(part) for part in item.parts)
                            item.parts.clear()
                            item.charged -= freed
                            buffered -= freed
                        else:
                            item.parts.append(chunk.data)
                            item.charged += len(chunk.data)
                            buffered += len(chunk.data)
                    if buffered > limits.buffer_bytes:
                        raise LimitExceededError(
                            f"the stream holds {buffered / 2**20:.1f} MiB of {len(pending)} image(s) still waiting "
                            f"for their last chunk, over the gateway's limit of {limits.buffer_bytes / 2**20:.0f} MiB "
                            "per stream (--max-stream-buffer-mb); finish an image before starting many others")
                    if chunk.last:
                        image = pending.pop(chunk.image_id)
                        buffered -= image.charged
                        if not take_slot():
                            break
                        with in_flight_lock:
                            in_flight[0] += 1
                        self._images.submit(run_image, chunk.image_id, image)
                for image_id in pending:
                    out.put(error_result(image_id, InvalidInputError("stream ended before the image's last chunk")))
            except grpc.RpcError:
                pass  # the caller went away; Deadline.cancelled is set by gRPC's callback
            except Exception as exc:
                reader_error.append(exc)
            finally:
                out.put(_READER_DONE)

        reader = threading.Thread(target=read, name="gateway-reader", daemon=True)
        reader.start()
        count = 0
        reader_done = False
        while not (reader_done and in_flight[0] == 0):
            try:
                item = out.get(timeout=POLL_S)
            except queue.Empty:
                if not deadline.alive:
                    break
                idle = time.monotonic() - last_activity[0]
                if in_flight[0] == 0 and not reader_done and idle > limits.idle_s:
                    raise DeadlineError(
                        f"the stream sent nothing for {limits.idle_s:g} s with no image in progress and was ended "
                        "(gateway flag --stream-idle-s); send the next image sooner or close the stream") from None
                continue
            if item is _READER_DONE:
                reader_done = True
                continue
            if item is _IMAGE_DONE:
                with in_flight_lock:
                    in_flight[0] -= 1
                slots.release()
                continue
            if not deadline.alive:
                break
            count += 1
            yield item  # type: ignore[misc]
            last_activity[0] = time.monotonic()
        log_event("stream", results=count, cancelled=deadline.cancelled.is_set())
        if reader_error:
            raise reader_error[0]

    def Info(self, request: object, context: grpc.ServicerContext) -> gateway_pb2.GatewayInfo:
        from facefuse.v1 import common_pb2 as c

        info = gateway_pb2.GatewayInfo(front_end=self.front_end_name)
        clients = self.pipeline.clients
        for name, stub in (("mica", clients.mica), ("ofer", clients.ofer), ("fusion", clients.fusion)):
            if stub is None:
                info.backends.add(service=name, ready=False, message="not configured")
                continue
            try:
                info.backends.append(stub.Info(c.InfoRequest(), timeout=5))
            except grpc.RpcError as exc:
                info.backends.add(service=name, ready=False, message=f"unavailable: {exc.details()}")
        return info


DET_THRESH_ENV = "FACEFUSE_DET_THRESH"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    replicas = " (host:port; replicas: dns:///NAME:PORT or ip:port,ip:port, round robin with retries)"
    parser.add_argument("--mica", help="address of the mica service" + replicas)
    parser.add_argument("--ofer", help="address of the ofer service" + replicas)
    parser.add_argument("--fusion", help="address of the fusion service" + replicas)
    backend_tls = parser.add_argument_group("TLS to the backends (docs/scaling.md#security)")
    backend_tls.add_argument("--backend-ca", type=Path, help="call the backends over TLS, trusting this PEM CA")
    backend_tls.add_argument("--backend-cert", type=Path, help="mutual TLS: this gateway's PEM client certificate")
    backend_tls.add_argument("--backend-key", type=Path, help="mutual TLS: the PEM key of --backend-cert")
    backend_tls.add_argument("--backend-tls-name", help="host name the backends' certificates must carry "
                                                         "(default: the host of each address)")
    parser.add_argument("--assets", help="folder with the official files (SCRFD detector); default $FACEFUSE_ASSETS")
    parser.add_argument("--max-image-mb", type=int, default=DEFAULT_MAX_IMAGE_MB, help="largest encoded image accepted")
    parser.add_argument("--max-pixels", type=int, default=40_000_000, help="largest decoded image accepted (pixels)")
    parser.add_argument("--max-streams", type=int, default=DEFAULT_MAX_STREAMS,
                        help="concurrent Process streams; more are refused with RESOURCE_EXHAUSTED")
    parser.add_argument("--stream-in-flight", type=int, default=DEFAULT_STREAM_IN_FLIGHT,
                        help="images of one stream being processed or waiting to be read by its client")
    parser.add_argument("--stream-idle-s", type=float, default=DEFAULT_STREAM_IDLE_S,
                        help="a stream that sends nothing for this long with no image in progress is ended")
    parser.add_argument("--max-stream-buffer-mb", type=int, default=DEFAULT_STREAM_BUFFER_MB,
                        help="bytes one stream may hold in images still missing their last chunk")
    parser.add_argument("--image-workers", type=int, default=DEFAULT_IMAGE_WORKERS,
                        help="images processed at once, shared by all streams")
    parser.add_argument("--faces-in-flight", type=int, default=DEFAULT_FACES_IN_FLIGHT,
                        help="faces at the model services at once, shared by all streams (batches fill from these)")
    parser.set_defaults(workers=None)
    parser.add_argument("--max-decode-mb", type=int, default=DEFAULT_MAX_DECODE_BYTES >> 20,
                        help="memory one image's decoding may take, charged from its header (MiB)")
    parser.add_argument("--det-thresh", type=det_thresh_argument, default=os.environ.get(DET_THRESH_ENV) or None,
                        metavar="T", help="default detector score threshold, 0 < T < 1 (default $FACEFUSE_DET_THRESH, "
                                          "else the detector's own: BlazeFace 0.5, SCRFD 0.4); a request's "
                                          "ProcessOptions.det_thresh overrides it (docs/open-pack.md)")


def build(args: argparse.Namespace) -> tuple[Callable[[grpc.Server], None], Sequence[str], Readiness]:
    from facefuse.assets.registry import assets_dir
    from facefuse.assets.store import ModelStore
    from facefuse.face.frontend import FaceFrontEnd

    limits = StreamLimits(max_streams=args.max_streams, in_flight=args.stream_in_flight, idle_s=args.stream_idle_s,
                          buffer_bytes=args.max_stream_buffer_mb << 20, max_image_bytes=args.max_image_mb << 20)
    if args.image_workers < 1:
        raise InvalidInputError(f"--image-workers must be at least 1, not {args.image_workers}")
    if not 1 <= args.faces_in_flight <= 1024:
        raise InvalidInputError(f"--faces-in-flight must be 1..1024, not {args.faces_in_flight}")
    # Every stream holds an RPC thread for its whole life: the pool gets one per stream plus a reserve,
    # so health, reflection and Info answer while every stream slot is taken (docs/services.md).
    if args.workers is None:
        args.workers = args.max_streams + UNARY_RESERVE
    elif args.workers <= args.max_streams:
        raise InvalidInputError(f"--workers {args.workers} leaves no RPC thread for health checks beyond "
                                f"--max-streams {args.max_streams}; use at least {args.max_streams + 1} or omit it")
    front_end = FaceFrontEnd.from_assets(assets_dir(args.assets), ModelStore(), det_thresh=args.det_thresh)
    if args.backend_ca is None and (args.backend_cert or args.backend_key or args.backend_tls_name):
        raise InvalidInputError("--backend-cert, --backend-key and --backend-tls-name need --backend-ca")
    tls = ClientTls(args.backend_ca, args.backend_cert, args.backend_key) if args.backend_ca is not None else None
    clients = MeshClients.connect(args.mica, args.ofer, args.fusion, args.max_message_mb, tls=tls,
                                  tls_name=args.backend_tls_name)
    pipeline = FacePipeline(front_end, clients, max_pixels=args.max_pixels, max_decode_bytes=args.max_decode_mb << 20,
                            face_workers=args.faces_in_flight)
    servicer = GatewayServicer(pipeline, limits=limits, image_workers=args.image_workers, front_end_name=front_end.name)
    return (
        lambda server: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server),
        [SERVICE_NAME],
        {SERVICE_NAME: BackendReadiness({name: clients.by_backend.get(name) for name in ("mica", "ofer", "fusion")})},
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(
        "facefuse-gateway", "facefuse gateway: images in, faces and reconstructions out", add_arguments, build, argv
    )


if __name__ == "__main__":
    raise SystemExit(main())
