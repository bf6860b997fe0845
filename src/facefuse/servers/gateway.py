"""The gateway: images stream in, one result per face streams out; thin over ``pipeline.orchestration``.

A reader thread assembles chunked images and hands each complete image to a worker pool; results are
yielded in completion order. Limits: bytes per image (RESOURCE_EXHAUSTED for that image, the stream
goes on), images in flight (back-pressure on the reader), pixels (decompression bombs refused).
"""

from __future__ import annotations

import argparse
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from facefuse import wire
from facefuse.errors import FacefuseError, InvalidInputError, LimitExceededError
from facefuse.pipeline.orchestration import FacePipeline, MeshClients, error_result
from facefuse.servers.base import Readiness, caller_time_left, log_event, run_cli, unary_errors
from facefuse.servers.readiness import BackendReadiness
from facefuse.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

SERVICE_NAME = "facefuse.v1.Gateway"
DEFAULT_MAX_IMAGE_MB = 50
_END = object()


@dataclass
class _PendingImage:
    options: gateway_pb2.ProcessOptions
    parts: list[bytes] = field(default_factory=list)
    size: int = 0
    mask: common_pb2.Tensor | None = None
    refused: FacefuseError | None = None


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, pipeline: FacePipeline, *, max_image_bytes: int = DEFAULT_MAX_IMAGE_MB << 20,
                 image_workers: int = 4, front_end_name: str = "") -> None:
        self.pipeline = pipeline
        self.max_image_bytes = max_image_bytes
        self.image_workers = image_workers
        self.front_end_name = front_end_name

    def Process(self, request_iterator: Iterator[gateway_pb2.ImageChunk],
                context: grpc.ServicerContext) -> Iterator[gateway_pb2.FaceResult]:
        out: queue.Queue[object] = queue.Queue()
        in_flight = threading.Semaphore(self.image_workers * 2)
        pool = ThreadPoolExecutor(max_workers=self.image_workers, thread_name_prefix="image")
        cancelled = threading.Event()
        context.add_callback(cancelled.set)
        left = caller_time_left(context)
        deadline = None if left is None else time.monotonic() + left
        tasks: list[object] = []
        reader_error: list[BaseException] = []

        def run_image(image_id: str, pending: _PendingImage) -> None:
            try:
                if pending.refused is not None:
                    out.put(error_result(image_id, pending.refused))
                    return
                mask = wire.to_numpy(pending.mask, "mask") if pending.mask is not None else None
                for result in self.pipeline.process_image(image_id, b"".join(pending.parts), pending.options, mask, deadline):
                    if cancelled.is_set():
                        return
                    out.put(result)
            except Exception as exc:  # noqa: BLE001 - one image's failure never ends the stream
                out.put(error_result(image_id, exc))
            finally:
                in_flight.release()

        def read() -> None:
            pending: dict[str, _PendingImage] = {}
            try:
                for chunk in request_iterator:
                    if cancelled.is_set():
                        break
                    if not chunk.image_id:
                        out.put(error_result("", InvalidInputError("ImageChunk.image_id is empty")))
                        continue
                    item = pending.get(chunk.image_id)
                    if item is None:
                        item = pending[chunk.image_id] = _PendingImage(options=chunk.options)
                    if chunk.HasField("mask"):
                        item.mask = chunk.mask
                    if item.refused is None:
                        item.size += len(chunk.data)
                        if item.size > self.max_image_bytes:
                            item.refused = LimitExceededError(
                                f"image is over the gateway's limit of {self.max_image_bytes >> 20} MiB")
                            item.parts.clear()
                        else:
                            item.parts.append(chunk.data)
                    if chunk.last:
                        in_flight.acquire()
                        tasks.append(pool.submit(run_image, chunk.image_id, pending.pop(chunk.image_id)))
                for image_id in pending:
                    out.put(error_result(image_id, InvalidInputError("stream ended before the image's last chunk")))
            except grpc.RpcError:
                cancelled.set()
            except Exception as exc:  # noqa: BLE001
                reader_error.append(exc)
            finally:
                pool.shutdown(wait=True)
                out.put(_END)

        reader = threading.Thread(target=read, name="gateway-reader", daemon=True)
        reader.start()
        count = 0
        while True:
            item = out.get()
            if item is _END:
                break
            count += 1
            yield item  # type: ignore[misc]
        log_event("stream", results=count, cancelled=cancelled.is_set())
        if reader_error:
            context.abort(grpc.StatusCode.INTERNAL, f"reading the stream failed: {reader_error[0]}")

    @unary_errors
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mica", help="address of the mica service (host:port)")
    parser.add_argument("--ofer", help="address of the ofer service (host:port)")
    parser.add_argument("--fusion", help="address of the fusion service (host:port)")
    parser.add_argument("--assets", help="folder with the official files (SCRFD detector); default $FACEFUSE_ASSETS")
    parser.add_argument("--max-image-mb", type=int, default=DEFAULT_MAX_IMAGE_MB, help="largest encoded image accepted")
    parser.add_argument("--max-pixels", type=int, default=40_000_000, help="largest decoded image accepted (pixels)")
    parser.add_argument("--image-workers", type=int, default=4, help="images processed at once per stream")
    parser.add_argument("--det-thresh", type=float, default=None, help="detector score threshold")


def build(args: argparse.Namespace) -> tuple[Callable[[grpc.Server], None], Sequence[str], Readiness]:
    from facefuse.assets.registry import assets_dir
    from facefuse.assets.store import ModelStore
    from facefuse.face.frontend import FaceFrontEnd

    front_end = FaceFrontEnd.from_assets(assets_dir(args.assets), ModelStore(), det_thresh=args.det_thresh)
    clients = MeshClients.connect(args.mica, args.ofer, args.fusion, args.max_message_mb)
    pipeline = FacePipeline(front_end, clients, max_pixels=args.max_pixels)
    servicer = GatewayServicer(pipeline, max_image_bytes=args.max_image_mb << 20, image_workers=args.image_workers,
                               front_end_name=front_end.name)
    return (lambda server: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server),
            [SERVICE_NAME], {SERVICE_NAME: BackendReadiness({"mica": args.mica, "ofer": args.ofer, "fusion": args.fusion})})


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("facefuse-gateway", "facefuse gateway: images in, faces and reconstructions out", add_arguments, build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
