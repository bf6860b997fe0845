"""Every bad request field, sent to every service of a real mesh on loopback, gets its exact status code.

Bad client input is INVALID_ARGUMENT (or RESOURCE_EXHAUSTED for a limit), never INTERNAL or UNKNOWN,
and never looks like a dead backend. The gateway answers per image, so its cases are read from the
status of each image's result; the model services answer the RPC itself.
"""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from facefuse import wire
from facefuse.servers.local import LocalMesh
from facefuse.v1 import (
    common_pb2,
    fusion_pb2,
    fusion_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    mica_pb2,
    mica_pb2_grpc,
    ofer_pb2,
    ofer_pb2_grpc,
)

pytestmark = pytest.mark.slow
INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
F32 = common_pb2.DType.FLOAT32
OPEN_K = 1404  # the open pack's shape length (468 vertices x 3)


def _face(**tensors: common_pb2.Tensor) -> common_pb2.Face:
    face = common_pb2.Face(arcface_blob=wire.from_numpy(np.zeros((3, 112, 112), np.float32)),
                           box=common_pb2.Box(x1=10, y1=10, x2=100, y2=100, score=0.9), score=0.9)
    for name, tensor in tensors.items():
        getattr(face, name).CopyFrom(tensor)
    return face


def _with_nan(shape: tuple[int, ...], value: float = np.nan) -> common_pb2.Tensor:
    array = np.zeros(shape, np.float32)
    array.flat[0] = value
    return wire.from_numpy(array)


OVERFLOW = common_pb2.Tensor(dtype=F32, shape=[2**32, 2**32], data=b"")  # dims multiply past int64 (to 0 there)
PAST_BYTES = common_pb2.Tensor(dtype=F32, shape=[3, 112, 2**40], data=b"\0" * 16)
BAD_DTYPE = common_pb2.Tensor(dtype=99, shape=[3, 112, 112], data=b"\0" * (3 * 112 * 112 * 4))


def _nan_box() -> common_pb2.Face:
    face = _face()
    face.box.x2 = float("nan")
    return face


MICA_CASES: dict[str, tuple[mica_pb2.PredictRequest, grpc.StatusCode]] = {
    "no faces": (mica_pb2.PredictRequest(), INVALID),
    "blob dims overflow int64": (mica_pb2.PredictRequest(faces=[common_pb2.Face(arcface_blob=OVERFLOW)]), INVALID),
    "blob dims past the bytes": (mica_pb2.PredictRequest(faces=[common_pb2.Face(arcface_blob=PAST_BYTES)]), INVALID),
    "blob unknown dtype enum": (mica_pb2.PredictRequest(faces=[common_pb2.Face(arcface_blob=BAD_DTYPE)]), INVALID),
    "blob NaN": (mica_pb2.PredictRequest(faces=[_face(arcface_blob=_with_nan((3, 112, 112)))]), INVALID),
    "blob inf": (mica_pb2.PredictRequest(faces=[_face(arcface_blob=_with_nan((3, 112, 112), np.inf))]), INVALID),
    "kps5 int64": (mica_pb2.PredictRequest(faces=[_face(kps5=wire.from_numpy(np.zeros((5, 2), np.int64)))]), INVALID),
    "landmarks NaN": (mica_pb2.PredictRequest(faces=[_face(landmarks=_with_nan((468, 3)))]), INVALID),
    "box NaN": (mica_pb2.PredictRequest(faces=[_nan_box()]), INVALID),
    "crop224 float": (
        mica_pb2.PredictRequest(faces=[_face(crop224=wire.from_numpy(np.zeros((224, 224, 3), np.float32)))]),
        INVALID,
    ),
}


def _sample(**fields: object) -> ofer_pb2.SampleRequest:
    return ofer_pb2.SampleRequest(**{"face": _face(), "num_samples": 2, **fields})


SAMPLE_CASES: dict[str, tuple[ofer_pb2.SampleRequest, grpc.StatusCode]] = {
    "negative steps": (_sample(steps=-1), INVALID),
    "steps past the schedule": (_sample(steps=1_000_000), EXHAUSTED),
    "negative num_samples": (_sample(num_samples=-5), INVALID),
    "int32-max num_samples": (_sample(num_samples=2**31 - 1), EXHAUSTED),
    "negative chunk_size": (_sample(chunk_size=-3), INVALID),
    "guide_strength NaN": (_sample(guide_strength=float("nan")), INVALID),
    "guide_strength inf": (_sample(guide_strength=float("inf")), INVALID),
    "negative start_t0": (_sample(start_t0=-1), INVALID),
    "unknown mode": (_sample(mode="turbo"), INVALID),
    "start_shape NaN": (_sample(start_shape=_with_nan((OPEN_K,))), INVALID),
    "guide_shape dims overflow": (_sample(guide_shape=OVERFLOW), INVALID),
    "visibility region NaN": (_sample(visibility=common_pb2.Visibility(regions={"nose": float("nan")})), INVALID),
    "visibility unknown region not reported": (
        _sample(visibility=common_pb2.Visibility(regions={"nose": 1.0}, unknown=["elbow"])), INVALID),
    "visibility per_vertex inf": (
        _sample(visibility=common_pb2.Visibility(per_vertex=_with_nan((468,), np.inf))),
        INVALID,
    ),
    "face crop dims overflow": (ofer_pb2.SampleRequest(face=_face(crop_box224=OVERFLOW)), INVALID),
    "face farl_input NaN": (ofer_pb2.SampleRequest(face=_face(farl_input=_with_nan((3, 224, 224)))), INVALID),
}


def _rank(candidates: common_pb2.Tensor) -> ofer_pb2.RankRequest:
    return ofer_pb2.RankRequest(face=_face(), candidates=candidates)


RANK_CASES: dict[str, tuple[ofer_pb2.RankRequest, grpc.StatusCode]] = {
    "candidates NaN": (_rank(_with_nan((3, OPEN_K))), INVALID),
    "candidates dims overflow": (_rank(OVERFLOW), INVALID),
    "candidates int32": (_rank(wire.from_numpy(np.zeros((3, OPEN_K), np.int32))), INVALID),
    "candidates wrong K": (_rank(wire.from_numpy(np.zeros((3, 7), np.float32))), INVALID),
    "too many candidates": (_rank(wire.from_numpy(np.zeros((1002, OPEN_K), np.float32))), EXHAUSTED),
}


def _fuse(**fields: object) -> fusion_pb2.FuseRequest:
    request = fusion_pb2.FuseRequest(strategy="linear", mica_shape=wire.from_numpy(np.zeros(OPEN_K, np.float32)),
                                     samples=wire.from_numpy(np.zeros((4, OPEN_K), np.float32)),
                                     scores=wire.from_numpy(np.zeros(4, np.float32)))
    for name, value in fields.items():
        if isinstance(value, dict):
            getattr(request, name).update(value)
        elif isinstance(value, str):
            setattr(request, name, value)
        else:
            getattr(request, name).CopyFrom(value)
    return request


def _pose_fit(**change: Any) -> common_pb2.PoseFitInput:
    """A well-formed pose_fit (468 points on a plausible face), with ``change`` applied (None: field left out)."""
    grid = np.stack(np.meshgrid(np.linspace(200, 300, 26), np.linspace(150, 300, 18)), -1).reshape(-1, 2)
    points = np.concatenate([grid, np.zeros((468, 1))], axis=1).astype(np.float32)
    fields: dict[str, Any] = {"landmarks": wire.from_numpy(points),
                              "image_size": wire.from_numpy(np.array([512, 512], np.int32)),
                              "focal_px": 600.0, "focal_source": "default"}
    fields.update(change)
    return common_pb2.PoseFitInput(**{k: v for k, v in fields.items() if v is not None})


POSE_FIT_CASES: dict[str, dict[str, Any]] = {
    "no landmarks": {"landmarks": None},
    "5 landmarks": {"landmarks": wire.from_numpy(np.zeros((5, 3), np.float32))},
    "landmarks NaN": {"landmarks": _with_nan((468, 3))},
    "landmarks far out": {"landmarks": wire.from_numpy(np.full((468, 3), 1e9, np.float32))},
    "no image_size": {"image_size": None},
    "image_size float": {"image_size": wire.from_numpy(np.array([512.0, 512.0], np.float32))},
    "image_size zero": {"image_size": wire.from_numpy(np.array([0, 512], np.int32))},
    "focal zero": {"focal_px": 0.0},
    "focal NaN": {"focal_px": float("nan")},
    "focal source unknown": {"focal_source": "guess"},
}

FUSE_CASES: dict[str, tuple[fusion_pb2.FuseRequest, grpc.StatusCode]] = {
    "unknown strategy": (_fuse(strategy="nope"), INVALID),
    "option NaN": (_fuse(options={"w": float("nan")}), INVALID),
    "option inf": (_fuse(options={"w": float("inf")}), INVALID),
    "unknown option": (_fuse(options={"bogus": 1.0}), INVALID),
    "samples NaN": (_fuse(samples=_with_nan((4, OPEN_K))), INVALID),
    "samples dims overflow": (_fuse(samples=OVERFLOW), INVALID),
    "scores inf": (_fuse(scores=_with_nan((4,), np.inf)), INVALID),
    "mica_shape wrong length": (_fuse(mica_shape=wire.from_numpy(np.zeros(300, np.float32))), INVALID),
    "per_vertex wrong length": (
        _fuse(visibility=common_pb2.Visibility(per_vertex=wire.from_numpy(np.ones(5, np.float32)))),
        INVALID,
    ),
    "region out of range": (_fuse(visibility=common_pb2.Visibility(regions={"nose": 2.0})), INVALID),
    "unknown region not reported": (_fuse(visibility=common_pb2.Visibility(regions={"nose": 0.5}, unknown=["lips"])),
                                    INVALID),
    "too many samples": (
        _fuse(
            samples=wire.from_numpy(np.zeros((1002, OPEN_K), np.float32)),
            scores=wire.from_numpy(np.zeros(1002, np.float32)),
        ),
        EXHAUSTED,
    ),
    **{f"pose_fit {name}": (_fuse(pose_fit=_pose_fit(**change)), INVALID) for name, change in POSE_FIT_CASES.items()},
}


def _call_each(cases: dict, call: Callable[[object], object]) -> dict[str, str]:
    """The code each case got, by name, next to the code it should get (a diff shows every miss at once)."""
    got = {}
    for name, (request, expected) in cases.items():
        try:
            call(request)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
            assert exc.details(), name
        got[name] = f"{code.name} (want {expected.name})"
    return got


def _expect(cases: dict) -> dict[str, str]:
    return {name: f"{code.name} (want {code.name})" for name, (_, code) in cases.items()}


def test_mica_refuses_each_bad_field_with_its_code(open_mesh: LocalMesh) -> None:
    with grpc.insecure_channel(open_mesh.address("mica")) as channel:
        stub = mica_pb2_grpc.MicaServiceStub(channel)
        assert _call_each(MICA_CASES, lambda r: stub.Predict(r, timeout=30)) == _expect(MICA_CASES)


def test_ofer_refuses_each_bad_field_with_its_code(open_mesh: LocalMesh) -> None:
    with grpc.insecure_channel(open_mesh.address("ofer")) as channel:
        stub = ofer_pb2_grpc.OferServiceStub(channel)
        assert _call_each(SAMPLE_CASES, lambda r: list(stub.Sample(r, timeout=30))) == _expect(SAMPLE_CASES)
        assert _call_each(RANK_CASES, lambda r: stub.Rank(r, timeout=30)) == _expect(RANK_CASES)


def test_fusion_refuses_each_bad_field_with_its_code(open_mesh: LocalMesh) -> None:
    with grpc.insecure_channel(open_mesh.address("fusion")) as channel:
        stub = fusion_pb2_grpc.FusionServiceStub(channel)
        stub.Fuse(_fuse(), timeout=30)  # the well-formed request the cases spoil is accepted
        assert stub.Fuse(_fuse(pose_fit=_pose_fit()), timeout=60).HasField("posed")
        assert _call_each(FUSE_CASES, lambda r: stub.Fuse(r, timeout=30)) == _expect(FUSE_CASES)


def _box(x1: float, y1: float, x2: float, y2: float) -> common_pb2.Box:
    return common_pb2.Box(x1=x1, y1=y1, x2=x2, y2=y2, score=1.0)


def _sixteen_bit_rgba_png_bomb(width: int, height: int) -> bytes:
    """A valid 16-bit RGBA PNG of one colour, compressed row by row (never held whole in memory)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    row = b"\x00" + b"\x9c\x40" * 4 * width
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _gateway_cases(jpeg: bytes) -> dict[str, tuple[gateway_pb2.ImageChunk, grpc.StatusCode]]:
    Opts = gateway_pb2.ProcessOptions
    mask = wire.from_numpy(np.zeros((512, 512), np.uint8))

    def image(options: gateway_pb2.ProcessOptions | None = None, **fields: object) -> gateway_pb2.ImageChunk:
        return gateway_pb2.ImageChunk(data=jpeg, last=True, options=options or Opts(method="detect"), **fields)

    return {
        "unknown method": (image(Opts(method="paint")), INVALID),
        "unknown strategy": (image(Opts(method="fuse", strategy="nope")), INVALID),
        "unknown selection": (image(Opts(selection="biggest")), INVALID),
        "negative num_samples": (image(Opts(method="fuse", num_samples=-1)), INVALID),
        "negative steps": (image(Opts(method="fuse", steps=-7)), INVALID),
        "strategy option NaN": (image(Opts(method="fuse", strategy_options={"w": float("nan")})), INVALID),
        "t0 inf": (image(Opts(method="fuse", strategy="sdedit", strategy_options={"t0": float("inf")})), INVALID),
        "t0 huge": (image(Opts(method="fuse", strategy="sdedit", strategy_options={"t0": 1e300})), INVALID),
        "t0 fractional": (image(Opts(method="fuse", strategy="sdedit", strategy_options={"t0": 2.5})), INVALID),
        "strength NaN": (
            image(Opts(method="fuse", strategy="guided", strategy_options={"strength": float("nan")})),
            INVALID,
        ),
        "unknown visibility source": (image(Opts(visibility_off=["eyes"])), INVALID),
        "det_thresh 1": (image(Opts(det_thresh=1.0)), INVALID),
        "det_thresh negative": (image(Opts(det_thresh=-0.5)), INVALID),
        "det_thresh NaN": (image(Opts(det_thresh=float("nan"))), INVALID),
        "box NaN": (image(Opts(boxes=[_box(1, 1, float("nan"), 50)])), INVALID),
        "box inverted": (image(Opts(boxes=[_box(50, 50, 10, 10)])), INVALID),
        "too many boxes": (image(Opts(boxes=[_box(1, 1, 50, 50)] * 65)), EXHAUSTED),
        "mask float": (image(mask=wire.from_numpy(np.zeros((512, 512), np.float32))), INVALID),
        "mask 3-d": (image(mask=wire.from_numpy(np.zeros((512, 512, 1), np.uint8))), INVALID),
        "mask other size": (image(mask=wire.from_numpy(np.zeros((64, 64), np.uint8))), INVALID),
        "mask dims overflow": (image(mask=OVERFLOW), INVALID),
        "ok with a mask": (image(mask=mask), grpc.StatusCode.OK),
        "16-bit bomb under the pixel limit": (
            gateway_pb2.ImageChunk(data=_sixteen_bit_rgba_png_bomb(6400, 6100), last=True),
            EXHAUSTED,
        ),  # 39 M px at 16 B/px: 625 MB
    }


def test_gateway_gives_each_bad_field_its_code_per_image(open_mesh: LocalMesh, astronaut_jpeg: bytes) -> None:
    cases = _gateway_cases(astronaut_jpeg)
    bomb = cases["16-bit bomb under the pixel limit"][0].data
    assert len(bomb) < 500_000, len(bomb)
    chunks = []
    for index, (name, (chunk, _)) in enumerate(cases.items()):
        chunk.image_id = f"{index}:{name}"
        chunks.append(chunk)
    chunks.append(gateway_pb2.ImageChunk(image_id="x" * 2000, data=astronaut_jpeg, last=True))
    with grpc.insecure_channel(
        open_mesh.address("gateway"), options=[("grpc.max_send_message_length", 64 << 20)]
    ) as channel:
        started = time.monotonic()
        results = list(gateway_pb2_grpc.GatewayStub(channel).Process(iter(chunks), timeout=120))
        elapsed = time.monotonic() - started
    codes: dict[str, str] = {}
    for result in results:
        name = (
            result.image_id.partition(":")[2]
            if ":" in result.image_id
            else f"image_id of {len(result.image_id)}+ chars"
        )
        codes[name] = _code_name(result.status.code)
        assert result.status.code == 0 or result.status.message, name
    expected = {name: code.name for name, (_, code) in cases.items()} | {"image_id of 64+ chars": "INVALID_ARGUMENT"}
    assert codes == expected
    assert elapsed < 60


def _code_name(value: int) -> str:
    return next(code.name for code in grpc.StatusCode if code.value[0] == value)


class _AbortingOfer(ofer_pb2_grpc.OferServiceServicer):
    """An ofer service double that answers every call with one status code."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self.code = code

    def Sample(self, request, context):
        context.abort(self.code, f"double says {self.code.name}")

    def Rank(self, request, context):
        context.abort(self.code, f"double says {self.code.name}")


class _ZeroMica:
    def __init__(self) -> None:
        from facefuse.packs.base import BackendStatus

        self.status = BackendStatus("mica", "zero", "test", True, False, "ready")

    def predict(self, faces):
        from facefuse.packs.base import ShapeResult

        return [ShapeResult(vertices_mm=np.zeros((3, 3), np.float32), faces=np.array([[0, 1, 2]], np.int32),
                            topology="test", shape=np.zeros(300, np.float32)) for _ in faces]


class _OneFace:
    name = "fixed"

    def detect(self, image):
        from facefuse.face.types import Detection

        return [
            Detection(
                box=np.array([10, 10, 100, 100], np.float32),
                score=0.9,
                kps5=np.full((5, 2), 50.0, np.float32),
                detector="fixed",
            )
        ]

    def align(self, image, detection):
        from facefuse.face.types import AlignedFace

        return AlignedFace(detection, np.zeros((112, 112, 3), np.uint8), np.zeros((224, 224, 3), np.uint8),
                           np.zeros((224, 224, 3), np.float32), np.zeros((3, 112, 112), np.float32))


@pytest.mark.parametrize(("ofer_code", "face_code", "falls_back"), [
    (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.OK, True),
    (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.OK, True),
    (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT, False),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.RESOURCE_EXHAUSTED, False),
    (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, False),
    (grpc.StatusCode.INTERNAL, grpc.StatusCode.INTERNAL, False),
    (grpc.StatusCode.CANCELLED, grpc.StatusCode.CANCELLED, False),
], ids=lambda v: v.name if isinstance(v, grpc.StatusCode) else str(v))
def test_fuse_falls_back_to_mica_only_when_ofer_is_down_or_late(ofer_code: grpc.StatusCode, face_code: grpc.StatusCode,
                                                               falls_back: bool, astronaut_jpeg: bytes) -> None:
    """Real mica and ofer servers on loopback (ofer a double answering ``ofer_code``), the gateway's pipeline
    in process: only UNAVAILABLE/DEADLINE_EXCEEDED give MICA's shape flagged; any other code is the face's."""
    from facefuse.pipeline.orchestration import FacePipeline, MeshClients
    from facefuse.rpc.deadline import Deadline
    from facefuse.servers.base import ServerOptions, start_server
    from facefuse.servers.mica import SERVICE_NAME as MICA
    from facefuse.servers.mica import MicaServicer
    from facefuse.servers.ofer import SERVICE_NAME as OFER

    mica = start_server(lambda s: mica_pb2_grpc.add_MicaServiceServicer_to_server(MicaServicer(_ZeroMica()), s),
                        [MICA], ServerOptions())
    ofer = start_server(lambda s: ofer_pb2_grpc.add_OferServiceServicer_to_server(_AbortingOfer(ofer_code), s),
                        [OFER], ServerOptions())
    clients = MeshClients.connect(f"127.0.0.1:{mica.port}", f"127.0.0.1:{ofer.port}", None)
    pipeline = FacePipeline(_OneFace(), clients)
    try:
        options = gateway_pb2.ProcessOptions(method="fuse", strategy="linear")
        (result,) = list(pipeline.process_image("a", astronaut_jpeg, options, deadline=Deadline.after(30)))
    finally:
        pipeline.close()
        clients.close()
        mica.stop(0)
        ofer.stop(0)
    assert _code_name(result.status.code) == face_code.name, result.status.message
    assert (result.reconstruction.fallback != "") == falls_back
    if falls_back:
        assert result.reconstruction.strategy == "mica" and "ofer unavailable" in result.reconstruction.fallback
    else:
        assert f"double says {ofer_code.name}" in result.status.message


NOT_UTF8_ID = b"\x0a\x02\xff\xfe"  # field 1 (a string) holding bytes that are not UTF-8
TRUNCATED = b"\x0a\x10\x2a"  # field 1 says 16 bytes follow; one does


@pytest.mark.parametrize("raw", [NOT_UTF8_ID, TRUNCATED], ids=["not-utf8", "truncated"])
def test_request_bytes_that_do_not_parse_are_invalid_argument(
    open_mesh: LocalMesh, astronaut_jpeg: bytes, raw: bytes
) -> None:
    """gRPC's own answer would be INTERNAL ("Exception deserializing request!"), a bug's code."""
    unary = {"mica": "/facefuse.v1.MicaService/Predict", "fusion": "/facefuse.v1.FusionService/Fuse",
             "ofer": "/facefuse.v1.OferService/Rank"}
    for service, method in unary.items():
        with grpc.insecure_channel(open_mesh.address(service)) as channel:
            call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as caught:
                call(raw, timeout=30)
            assert caught.value.code() == INVALID, (service, caught.value.details())
    with grpc.insecure_channel(open_mesh.address("ofer")) as channel:
        sample = channel.unary_stream("/facefuse.v1.OferService/Sample", request_serializer=lambda b: b,
                                      response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as caught:
            list(sample(raw, timeout=30))
        assert caught.value.code() == INVALID
    good = gateway_pb2.ImageChunk(image_id="good", data=astronaut_jpeg, last=True).SerializeToString()
    with grpc.insecure_channel(open_mesh.address("gateway")) as channel:
        process = channel.stream_stream("/facefuse.v1.Gateway/Process", request_serializer=lambda b: b,
                                        response_deserializer=gateway_pb2.FaceResult.FromString)
        results: list[gateway_pb2.FaceResult] = []
        with pytest.raises(grpc.RpcError) as caught:
            results.extend(process(iter([good, raw]), timeout=60))  # keeps what arrived before the error
        assert caught.value.code() == INVALID
        assert [r.image_id for r in results] == ["good"] and results[0].status.code == 0  # what came before stands


def test_our_own_bug_is_internal_for_that_face_and_logged_with_its_traceback(astronaut_jpeg: bytes,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    from facefuse.pipeline.orchestration import FacePipeline, MeshClients

    class BrokenAlign(_OneFace):
        def align(self, image, detection):
            raise ZeroDivisionError("a bug in alignment")

    pipeline = FacePipeline(BrokenAlign(), MeshClients(None, None, None))
    try:
        with caplog.at_level("ERROR", logger="facefuse"):
            (result,) = list(pipeline.process_image("a", astronaut_jpeg, gateway_pb2.ProcessOptions(method="detect")))
    finally:
        pipeline.close()
    assert _code_name(result.status.code) == "INTERNAL" and "a bug in alignment" in result.status.message
    logged = [r for r in caplog.records if r.exc_info and r.exc_info[0] is ZeroDivisionError]
    assert logged, "an INTERNAL result must be logged with its traceback"
