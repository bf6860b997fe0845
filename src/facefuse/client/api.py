"""Python client of the gateway: stream images in, get one ``FaceResult`` per face back.

    from facefuse.client.api import GatewayClient, ImageInput
    with GatewayClient("127.0.0.1:50050") as client:
        for result in client.process([ImageInput.from_path("me.jpg")], method="mica"):
            print(result.image_id, result.face_index, result.status.code)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from facefuse import wire
from facefuse.rpc.options import channel_options
from facefuse.rpc.security import ClientTls, bearer_metadata, secure_or_insecure_channel
from facefuse.rpc.status import error_from_rpc
from facefuse.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

CHUNK_BYTES = 1 << 20


@dataclass
class ImageInput:
    image_id: str
    data: bytes
    mask: np.ndarray | None = None

    @classmethod
    def from_path(cls, path: str | Path, image_id: str | None = None) -> ImageInput:
        path = Path(path)
        return cls(image_id or str(path), path.read_bytes())


def process_options(method: str = "detect", **fields: Any) -> gateway_pb2.ProcessOptions:
    """ProcessOptions from keyword arguments; unknown names fail loudly, None means default."""
    try:
        options = gateway_pb2.ProcessOptions(method=method)
        for name, value in fields.items():
            if value is None:
                continue
            if name == "strategy_options":
                options.strategy_options.update({k: float(v) for k, v in value.items()})
            elif name == "boxes":
                options.boxes.extend(common_pb2.Box(x1=b[0], y1=b[1], x2=b[2], y2=b[3]) for b in value)
            elif isinstance(value, (list, tuple)):
                getattr(options, name).extend(value)
            else:
                setattr(options, name, value)
    except (TypeError, ValueError) as exc:  # e.g. a string with undecodable bytes, a number out of range
        from facefuse.errors import InvalidInputError

        raise InvalidInputError(f"options cannot be sent: {exc}") from None
    return options


def image_chunks(images: Iterable[ImageInput], options: gateway_pb2.ProcessOptions,
                 chunk_bytes: int = CHUNK_BYTES) -> Iterator[gateway_pb2.ImageChunk]:
    """Split each image into chunks; options (and the mask) ride on the first chunk."""
    for image in images:
        data = image.data
        count = max(1, -(-len(data) // chunk_bytes))
        for i in range(count):
            chunk = gateway_pb2.ImageChunk(image_id=image.image_id, data=data[i * chunk_bytes:(i + 1) * chunk_bytes],
                                           last=i == count - 1)
            if i == 0:
                chunk.options.CopyFrom(options)
                if image.mask is not None:
                    chunk.mask.CopyFrom(wire.from_numpy(np.asarray(image.mask, dtype=np.uint8)))
            yield chunk


class GatewayClient:
    """A connection to the gateway. ``ca`` (a PEM file) makes it TLS, trusting that CA; ``tls=True`` makes
    it TLS trusting the system's roots (a public ingress); ``token`` is sent as a bearer token on every call."""

    def __init__(self, address: str, *, max_message_mb: int = 64, timeout_s: float | None = None,
                 ca: str | Path | None = None, tls: bool = False, token: str | None = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.metadata = bearer_metadata(token)
        client_tls = ClientTls(Path(ca)) if ca is not None else ClientTls() if tls else None
        self.channel = secure_or_insecure_channel(address, channel_options(max_message_mb), client_tls)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            from facefuse.errors import BackendUnavailableError

            raise BackendUnavailableError(f"no gateway answers at {self.address} (is the mesh running?)") from None

    def process(
        self, images: Iterable[ImageInput], method: str = "detect", **options: object
    ) -> Iterator[gateway_pb2.FaceResult]:
        request = image_chunks(images, process_options(method, **options))
        try:
            yield from self.stub.Process(request, timeout=self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"gateway {self.address}") from None

    def info(self) -> gateway_pb2.GatewayInfo:
        try:
            return self.stub.Info(common_pb2.InfoRequest(), timeout=10, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"gateway {self.address}") from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
