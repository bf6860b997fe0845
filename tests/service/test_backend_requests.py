"""What the gateway's pipeline sends each backend: only the image tensors that backend reads (issue 18).

Real gRPC servers on loopback that record every request they get; the pipeline runs a fused face
through them and the test looks at each request's fields and size.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from facefuse import wire
from facefuse.face.types import AlignedFace, Detection
from facefuse.pipeline.orchestration import FacePipeline, MeshClients
from facefuse.servers.base import ServerOptions, start_server
from facefuse.v1 import (
    common_pb2,
    fusion_pb2,
    fusion_pb2_grpc,
    gateway_pb2,
    mica_pb2,
    mica_pb2_grpc,
    ofer_pb2,
    ofer_pb2_grpc,
)

SHAPE = wire.from_numpy(np.zeros(300, np.float32))


class RecordingMica(mica_pb2_grpc.MicaServiceServicer):
    def __init__(self, pack: str) -> None:
        self.pack = pack
        self.requests: list[mica_pb2.PredictRequest] = []

    def Info(self, request: common_pb2.InfoRequest, context: grpc.ServicerContext) -> common_pb2.BackendInfo:
        if self.pack == "no-info":
            context.abort(grpc.StatusCode.UNAVAILABLE, "no Info today")
        return common_pb2.BackendInfo(service="mica", pack=self.pack, ready=True)

    def Predict(self, request: mica_pb2.PredictRequest, context: grpc.ServicerContext) -> mica_pb2.PredictResponse:
        self.requests.append(request)
        return mica_pb2.PredictResponse(predictions=[mica_pb2.ShapePrediction(shape=SHAPE)])


class RecordingOfer(ofer_pb2_grpc.OferServiceServicer):
    def __init__(self, pack: str) -> None:
        self.pack = pack
        self.samples: list[ofer_pb2.SampleRequest] = []
        self.ranks: list[ofer_pb2.RankRequest] = []

    def Sample(self, request: ofer_pb2.SampleRequest, context: grpc.ServicerContext) -> Iterator[ofer_pb2.SampleChunk]:
        self.samples.append(request)
        yield ofer_pb2.SampleChunk(offset=0, shapes=wire.from_numpy(np.zeros((request.num_samples, 300), np.float32)),
                                   total=request.num_samples)

    def Rank(self, request: ofer_pb2.RankRequest, context: grpc.ServicerContext) -> ofer_pb2.RankResponse:
        self.ranks.append(request)
        count = wire.to_numpy(request.candidates).shape[0]
        return ofer_pb2.RankResponse(scores=wire.from_numpy(np.zeros(count, np.float32)))

    def Info(self, request: common_pb2.InfoRequest, context: grpc.ServicerContext) -> common_pb2.BackendInfo:
        if self.pack == "no-info":
            context.abort(grpc.StatusCode.UNAVAILABLE, "no Info today")
        return common_pb2.BackendInfo(service="ofer", pack=self.pack, ready=True)


class PlainFusion(fusion_pb2_grpc.FusionServiceServicer):
    def Fuse(self, request: fusion_pb2.FuseRequest, context: grpc.ServicerContext) -> fusion_pb2.FuseResponse:
        return fusion_pb2.FuseResponse(shape=SHAPE, strategy=request.strategy)

    def ListStrategies(self, request: object, context: grpc.ServicerContext) -> fusion_pb2.ListStrategiesResponse:
        return fusion_pb2.ListStrategiesResponse(names=["linear"], default_strategy="linear")


class OneFace:
    """A front end that finds one face with every crop filled (the full ~1.5 MB Face message)."""

    name = "fixed"

    def detect(self, image: np.ndarray) -> list[Detection]:
        return [Detection(box=np.array([10, 10, 100, 100], np.float32), score=0.9,
                          kps5=np.full((5, 2), 50.0, np.float32), detector="fixed")]

    def align(self, image: np.ndarray, detection: Detection) -> AlignedFace:
        rng = np.random.default_rng(0)
        return AlignedFace(detection, rng.integers(0, 255, (112, 112, 3), np.uint8),
                           rng.integers(0, 255, (224, 224, 3), np.uint8),
                           rng.random((224, 224, 3), np.float32), rng.random((3, 112, 112), np.float32),
                           farl_input=rng.random((3, 224, 224), np.float32))


@pytest.fixture(params=["flame", "open", "no-info"])
def recorded(request: pytest.FixtureRequest, astronaut_jpeg: bytes):
    mica, ofer = RecordingMica(request.param), RecordingOfer(request.param)
    servers = [
        start_server(lambda s: mica_pb2_grpc.add_MicaServiceServicer_to_server(mica, s), ["m"], ServerOptions()),
        start_server(lambda s: ofer_pb2_grpc.add_OferServiceServicer_to_server(ofer, s), ["o"], ServerOptions()),
        start_server(lambda s: fusion_pb2_grpc.add_FusionServiceServicer_to_server(PlainFusion(), s), ["f"],
                     ServerOptions()),
    ]
    clients = MeshClients.connect(*(f"127.0.0.1:{s.port}" for s in servers))
    pipeline = FacePipeline(OneFace(), clients)
    try:
        (result,) = list(pipeline.process_image("a", astronaut_jpeg, gateway_pb2.ProcessOptions(method="fuse",
                                                                                                num_samples=3)))
        yield request.param, result, mica, ofer
    finally:
        pipeline.close()
        clients.close()
        for server in servers:
            server.stop(0)


def _crops(face: common_pb2.Face) -> set[str]:
    return {name for name in ("crop112", "arcface_blob", "crop224", "crop_box224", "farl_input") if face.HasField(name)}


def test_each_backend_gets_only_the_tensors_it_reads(recorded) -> None:
    pack, result, mica, ofer = recorded
    assert result.status.code == 0, result.status.message
    full = wire.face_message(OneFace().align(np.zeros((1, 1, 3), np.uint8), OneFace().detect(np.zeros(1))[0]), 0,
                             (512, 512)).ByteSize()
    assert full > 1_400_000  # what every call carried before
    (predict,) = mica.requests
    assert predict.faces[0].HasField("kps5") and predict.faces[0].HasField("box")  # the small fields stay
    if pack == "flame":
        assert _crops(predict.faces[0]) == {"arcface_blob"}
        assert predict.ByteSize() < 160_000  # the 147 KB blob and little else
    elif pack == "open":  # the open pack's mica mirror-averages FaceMesh on the box crop
        assert _crops(predict.faces[0]) == {"arcface_blob", "crop_box224"}
        assert predict.ByteSize() < 800_000
    else:  # the pack unknown: what either pack reads, never less
        assert _crops(predict.faces[0]) == {"arcface_blob", "crop_box224"}
    (sample,) = ofer.samples
    (rank,) = ofer.ranks
    if pack == "flame":
        # the FaRL input rides along so the ofer service computes IdRank's context while it samples
        assert _crops(sample.face) == {"arcface_blob", "farl_input"}
        assert sample.ByteSize() < 800_000
        assert _crops(rank.face) == {"arcface_blob", "farl_input"}
    elif pack == "open":  # the open pack's Sample and Rank impute hidden landmarks from the box crop
        assert _crops(sample.face) == _crops(rank.face) == {"arcface_blob", "crop_box224"}
    else:  # the pack unknown: what either pack reads, never less
        assert _crops(sample.face) == _crops(rank.face) == {"arcface_blob", "crop_box224", "farl_input"}
    assert rank.ByteSize() < (1_400_000 if pack == "no-info" else 800_000)
