"""Tensor <-> numpy/torch round trips for every wire dtype, and the checks on malformed tensors."""

import numpy as np
import pytest
import torch

from facefuse import wire
from facefuse.errors import InvalidInputError
from facefuse.v1 import common_pb2

TORCH_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int16,
                torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.bool]


def _random(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -(2**31)), min(info.max, 2**31 - 1)
    return torch.randint(low, high, shape, generator=gen, dtype=torch.int64).to(dtype)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 4, 5)])
def test_torch_round_trip_every_dtype(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(7)
    tensor = _random(dtype, shape, gen)
    message = wire.from_torch(tensor, unit="mm")
    assert message.unit == "mm" and tuple(message.shape) == shape
    assert message.dtype == common_pb2.DType.Value(str(dtype).removeprefix("torch.").upper().replace("BOOL", "BOOL"))
    back = wire.to_torch(common_pb2.Tensor.FromString(message.SerializeToString()))
    assert back.dtype == dtype and tuple(back.shape) == shape
    assert torch.equal(back, tensor)


@pytest.mark.parametrize("dtype", ["<f4", "<f8", "<f2", "i1", "<i2", "<i4", "<i8", "u1", "<u2", "<u4", "<u8", "?",
                                   ">f4", ">i8", ">u2"])
def test_numpy_round_trip_including_big_endian(dtype: str) -> None:
    rng = np.random.default_rng(3)
    array = (rng.standard_normal((4, 6)) * 100).astype(dtype)
    message = wire.from_numpy(array)
    back = wire.to_numpy(message)
    assert back.dtype.byteorder in ("<", "|", "=") and back.dtype.kind == np.dtype(dtype).kind
    np.testing.assert_array_equal(back, array)
    # Little-endian raw bytes on the wire, whatever the source order.
    np.testing.assert_array_equal(
        np.frombuffer(message.data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(4, 6), array
    )


def test_bfloat16_crosses_between_numpy_and_torch() -> None:
    tensor = torch.tensor([1.5, -2.25, 3.0e3], dtype=torch.bfloat16)
    as_numpy = wire.to_numpy(wire.from_torch(tensor))
    np.testing.assert_array_equal(as_numpy.astype(np.float32), tensor.float().numpy())
    assert torch.equal(wire.to_torch(wire.from_numpy(as_numpy)), tensor)


def test_decoding_does_not_copy() -> None:
    message = wire.from_numpy(np.arange(12, dtype=np.float32).reshape(3, 4))
    array = wire.to_numpy(message)
    assert not array.flags.writeable and not array.flags.owndata
    base = array.base
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, bytes) and len(base) == 48  # a view of protobuf's bytes, not a copy of them
    tensor = wire.to_torch(message)
    assert tensor.untyped_storage().nbytes() == 48 and torch.equal(tensor, torch.arange(12.0).reshape(3, 4))


def test_non_contiguous_input_is_encoded_in_logical_order() -> None:
    array = np.arange(12, dtype=np.int32).reshape(3, 4).T
    np.testing.assert_array_equal(wire.to_numpy(wire.from_numpy(array)), array)
    tensor = torch.arange(12).reshape(3, 4).T
    assert torch.equal(wire.to_torch(wire.from_torch(tensor)), tensor)


def test_malformed_tensors_are_refused_with_the_field_name() -> None:
    good = wire.from_numpy(np.zeros((2, 3), np.float32))
    short = common_pb2.Tensor(dtype=good.dtype, shape=[2, 3], data=good.data[:-1])
    with pytest.raises(InvalidInputError, match=r"shape_in: 23 bytes do not match"):
        wire.to_numpy(short, "shape_in")
    with pytest.raises(InvalidInputError, match="unsupported or missing dtype"):
        wire.to_numpy(common_pb2.Tensor(shape=[1], data=b"\0"), "x")
    with pytest.raises(InvalidInputError, match="negative dimension"):
        wire.to_numpy(common_pb2.Tensor(dtype=common_pb2.DType.UINT8, shape=[-1], data=b""), "x")
    with pytest.raises(InvalidInputError, match=r"expected \(300\)"):
        wire.require(good, "beta", shape=(300,))
    with pytest.raises(InvalidInputError, match="expected one of"):
        wire.require(good, "beta", shape=(2, 3), dtypes=[common_pb2.DType.FLOAT64])
    with pytest.raises(InvalidInputError, match="cannot travel"):
        wire.from_numpy(np.zeros(2, dtype=np.complex64))


def test_mesh_message_carries_units_and_topology() -> None:
    mesh = wire.mesh_message(np.ones((4, 3)), np.array([[0, 1, 2], [0, 2, 3]]), "flame2020",
                             colors=np.full((4, 3), 200), uvs=np.zeros((4, 2)))
    assert mesh.vertices.unit == "mm" and mesh.topology == "flame2020"
    assert wire.to_numpy(mesh.faces).dtype == np.int32 and wire.to_numpy(mesh.vertex_colors).dtype == np.uint8


def _tensor(dtype: int, shape: list[int], data: bytes = b"") -> common_pb2.Tensor:
    return common_pb2.Tensor(dtype=dtype, shape=shape, data=data)


F32, U8 = common_pb2.DType.FLOAT32, common_pb2.DType.UINT8


@pytest.mark.parametrize("tensor, message", [
    (_tensor(F32, [2**32, 2**32]), "dimension over"),                 # product wraps int64 to 0 bytes
    (_tensor(F32, [2**31 - 1, 2**31 - 1, 4], b"\0" * 16), "do not match"),  # product far past the bytes
    (_tensor(U8, [0, 2**40]), "dimension over"),                      # zero-sized yet absurd
    (_tensor(U8, [-3, -4], b"\0" * 12), "negative dimension"),        # negatives multiplying to a match
    (_tensor(U8, [1] * 9, b"\0"), "dimensions; at most"),
    (_tensor(99, [1], b"\0"), "unsupported or missing dtype"),        # an enum value the proto never had
    (_tensor(F32, [3], b"\0" * 8), "do not match"),
], ids=["int64-wrap", "past-bytes", "zero-and-huge", "negatives", "too-many-axes", "bad-enum", "short"])
def test_hostile_shapes_and_dtypes_are_invalid_input_not_a_crash(tensor: common_pb2.Tensor, message: str) -> None:
    for decode in (wire.to_numpy, wire.to_torch):
        with pytest.raises(InvalidInputError, match=message):
            decode(tensor, "t")


def test_empty_tensors_with_zero_sized_axes_still_decode() -> None:
    assert wire.to_numpy(wire.from_numpy(np.zeros((0, 300), np.float32))).shape == (0, 300)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["<f4", "<f8", "<f2"])
def test_require_refuses_non_finite_floats(bad: float, dtype: str) -> None:
    values = np.zeros(5, dtype)
    values[3] = bad
    with pytest.raises(InvalidInputError, match="start_shape: contains NaN or infinite"):
        wire.require(wire.from_numpy(values), "start_shape", shape=(None,))
    np.testing.assert_array_equal(wire.require(wire.from_numpy(np.ones(5, dtype)), "s", shape=(5,)), np.ones(5))


def test_require_refuses_non_finite_bfloat16() -> None:
    tensor = wire.from_torch(torch.tensor([1.0, float("nan")], dtype=torch.bfloat16))
    with pytest.raises(InvalidInputError, match="NaN"):
        wire.require(tensor, "x", shape=(2,))


def test_require_takes_floats_unless_told_otherwise() -> None:
    with pytest.raises(InvalidInputError, match="expected one of"):
        wire.require(wire.from_numpy(np.zeros(3, np.int64)), "candidates", shape=(3,))
    assert wire.require(wire.from_numpy(np.zeros(3, np.uint8)), "c", shape=(3,), dtypes=[U8]).dtype == np.uint8


@pytest.mark.parametrize("field", ["x1", "y2", "score"])
def test_a_face_box_with_nan_is_invalid_input(field: str) -> None:
    face = common_pb2.Face(arcface_blob=wire.from_numpy(np.zeros((3, 112, 112), np.float32)),
                           box=common_pb2.Box(x1=1, y1=2, x2=30, y2=40, score=0.9))
    wire.aligned_face_from_message(face)
    setattr(face.box, field, float("nan"))
    with pytest.raises(InvalidInputError, match=f"face.box.{field}: nan is not a finite"):
        wire.aligned_face_from_message(face)
    nan_blob = np.zeros((3, 112, 112), np.float32)
    nan_blob[0, 0, 0] = np.inf
    with pytest.raises(InvalidInputError, match="arcface_blob: contains NaN"):
        wire.aligned_face_from_message(common_pb2.Face(arcface_blob=wire.from_numpy(nan_blob)))
