"""The mica service: the deterministic branch (MICA on the flame pack), thin over the core library."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import grpc

from facefuse import wire
from facefuse.errors import InvalidInputError, LimitExceededError
from facefuse.face.types import AlignedFace
from facefuse.packs.base import SCALE_SOURCES, ShapeBackend, ShapeResult
from facefuse.rpc.deadline import Deadline
from facefuse.servers.base import run_cli
from facefuse.servers.batching import DynamicBatcher
from facefuse.servers.common import add_model_arguments, backend_info, wait_all
from facefuse.v1 import mica_pb2, mica_pb2_grpc

SERVICE_NAME = "facefuse.v1.MicaService"
MAX_FACES_PER_REQUEST = 256


class MicaServicer(mica_pb2_grpc.MicaServiceServicer):
    def __init__(self, backend: ShapeBackend, *, max_batch: int = 16, batch_wait_s: float = 0.005) -> None:
        self.backend = backend
        self.batcher: DynamicBatcher[AlignedFace, ShapeResult] = DynamicBatcher(
            lambda faces, _stop_check: backend.predict(faces),
            max_batch=max_batch,
            max_wait_s=batch_wait_s,
            name="mica-batcher",
        )

    def Predict(self, request: mica_pb2.PredictRequest, context: grpc.ServicerContext) -> mica_pb2.PredictResponse:
        if not request.faces:
            raise InvalidInputError("PredictRequest.faces is empty")
        if len(request.faces) > MAX_FACES_PER_REQUEST:
            raise LimitExceededError(f"{len(request.faces)} faces in one request; the limit is {MAX_FACES_PER_REQUEST}")
        faces = [wire.aligned_face_from_message(f, f"faces[{i}]") for i, f in enumerate(request.faces)]
        if not self.backend.status.ready:
            self.backend.predict(faces)  # raises the backend's own FAILED_PRECONDITION message
        deadline = Deadline.from_context(context)
        results = wait_all(self.batcher.submit_many(faces, deadline), deadline)
        return mica_pb2.PredictResponse(
            predictions=[prediction_message(r, request.return_mesh, request.return_landmarks) for r in results],
            backend=backend_info(self.backend.status),
        )

    def Info(self, request: object, context: grpc.ServicerContext) -> object:
        return backend_info(self.backend.status)


def prediction_message(result: ShapeResult, with_mesh: bool, with_landmarks: bool) -> mica_pb2.ShapePrediction:
    message = mica_pb2.ShapePrediction()
    if result.shape is not None:
        message.shape.CopyFrom(wire.from_numpy(result.shape))
    if result.identity is not None:
        message.identity.CopyFrom(wire.from_numpy(result.identity))
    if result.scale_source:
        if result.scale_source not in SCALE_SOURCES or not 0.0 <= result.scale_confidence <= 1.0:
            raise ValueError(f"shape backend: scale {result.scale_source!r} {result.scale_confidence!r} is not "
                             f"one of {SCALE_SOURCES} with a confidence in [0, 1]")  # our bug: INTERNAL
        message.scale_source = result.scale_source
        message.scale_confidence = float(result.scale_confidence)
    if with_mesh:
        message.mesh.CopyFrom(wire.mesh_message(result.vertices_mm, result.faces, result.topology, uvs=result.uvs))
    if with_landmarks:
        if result.landmarks68_mm is not None:
            message.landmarks68.CopyFrom(wire.from_numpy(result.landmarks68_mm, unit="mm"))
        if result.kpt7_mm is not None:
            message.kpt7.CopyFrom(wire.from_numpy(result.kpt7_mm, unit="mm"))
    return message


def build(args: argparse.Namespace) -> tuple[Callable[[grpc.Server], None], Sequence[str], dict[str, bool]]:
    from facefuse.packs.loading import load_shape_backend

    backend = load_shape_backend(args.pack, args.assets, args.device)
    servicer = MicaServicer(backend, max_batch=args.max_batch, batch_wait_s=args.batch_wait_ms / 1000)
    return (lambda server: mica_pb2_grpc.add_MicaServiceServicer_to_server(servicer, server),
            [SERVICE_NAME], {SERVICE_NAME: backend.status.ready})


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("facefuse-mica", "MICA service: aligned faces in, metrical FLAME shapes out",
                   add_model_arguments, build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
