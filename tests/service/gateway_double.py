"""A real gRPC gateway on loopback whose answers a test scripts: honest, broken or hostile."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import numpy as np

from facefuse import wire
from facefuse.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

# ids of the images of one stream, in arrival order -> the results to send back
Script = Callable[[list[str]], Iterator[gateway_pb2.FaceResult]]


def face_result(
    image_id: str, method: str = "mica", *, face_index: int = 0, num_faces: int = 1
) -> gateway_pb2.FaceResult:
    """A well-formed OK result: a small face and, unless ``detect``, a small FLAME-like reconstruction."""
    rng = np.random.default_rng(face_index)
    face = common_pb2.Face(
        index=face_index, box=common_pb2.Box(x1=8, y1=8, x2=40, y2=40, score=0.9), score=0.9, detector="double",
        kps5=wire.from_numpy(np.array([[16, 18], [32, 18], [24, 26], [18, 34], [30, 34]], np.float32)),
        crop112=wire.from_numpy(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)),
    )
    result = gateway_pb2.FaceResult(image_id=image_id, face_index=face_index, num_faces=num_faces,
                                    status=common_pb2.Status(code=0), face=face, seconds=0.01)
    if method != "detect":
        vertices = np.array([[0, 0, 0], [50, 0, 0], [0, 50, 0], [0, 0, 50]], np.float32)
        triangles = np.array([[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]], np.int32)
        result.reconstruction.CopyFrom(gateway_pb2.Reconstruction(
            method=method, shape=wire.from_numpy(rng.normal(size=300).astype(np.float32)),
            mesh=wire.mesh_message(vertices, triangles, "flame2020"),
            kpt7=wire.from_numpy(rng.normal(size=(7, 3)).astype(np.float32))))
    return result


def honest(method: str = "mica") -> Script:
    def script(ids: list[str]) -> Iterator[gateway_pb2.FaceResult]:
        for image_id in ids:
            yield face_result(image_id, method)
    return script


class _Servicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, owner: GatewayDouble) -> None:
        self.owner = owner

    def Process(self, request_iterator: Iterator[gateway_pb2.ImageChunk],
                context: grpc.ServicerContext) -> Iterator[gateway_pb2.FaceResult]:
        ids = []
        for chunk in request_iterator:
            if chunk.last:
                ids.append(chunk.image_id)
                if len(ids) == self.owner.read_only:
                    break
        self.owner.received.append(ids)
        if self.owner.abort is not None:
            code, message, after = self.owner.abort
            yield from list(self.owner.script(ids))[:after]
            context.abort(code, message)
        yield from self.owner.script(ids)

    def Info(self, request: common_pb2.InfoRequest, context: grpc.ServicerContext) -> gateway_pb2.GatewayInfo:
        return gateway_pb2.GatewayInfo(front_end="double")


class GatewayDouble:
    """``with GatewayDouble(script) as gateway:`` serves facefuse.v1.Gateway at ``gateway.address``."""

    def __init__(self, script: Script, *, abort: tuple[grpc.StatusCode, str, int] | None = None,
                 read_only: int | None = None) -> None:
        self.script = script
        self.read_only = read_only  # stop reading the request stream after this many images
        self.abort = abort  # (code, message, results sent first): end the stream with that status
        self.received: list[list[str]] = []  # ids per stream, as the client sent them
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        gateway_pb2_grpc.add_GatewayServicer_to_server(_Servicer(self), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"

    def __enter__(self) -> GatewayDouble:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=None)
