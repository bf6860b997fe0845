"""The MediaPipe canonical face, parsed from the model store's bytes by facefuse's own protobuf reader."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from facefuse.assets.canonical_face import load_canonical_face, parse_canonical_face
from facefuse.assets.store import ModelStore
from facefuse.errors import AssetError


@pytest.fixture(scope="module")
def raw() -> bytes:
    return ModelStore().path("canonical_face_metadata").read_bytes()


@pytest.fixture(scope="module")
def face():
    return load_canonical_face(ModelStore())


def test_counts_ranges_and_topology(face):
    assert face.topology == "mediapipe468"
    assert face.vertices_mm.shape == (468, 3) and face.faces.shape == (898, 3) and face.uvs.shape == (468, 2)
    assert face.faces.dtype == np.int32 and face.faces.min() >= 0 and face.faces.max() == 467
    assert np.unique(face.faces).size == 468  # every vertex is used by some triangle
    x = face.vertices_mm[:, 0]
    assert 70.0 < x.max() < 85.0 and -85.0 < x.min() < -70.0  # about ±77 mm: centimetres became mm
    assert np.all(face.uvs >= 0) and np.all(face.uvs <= 1)
    # A proper surface: no edge is shared by more than two triangles.
    edges = np.sort(face.faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    assert counts.max() == 2
    assert face.landmark_ids.size == face.landmark_weights.size > 0 and np.all(face.landmark_weights > 0)


def test_geometry_is_a_face(face):
    v = face.vertices_mm
    # FaceMesh facts: 33/263 outer eye corners (image left / right), 1 nose tip, 152 chin, 10 forehead top.
    assert v[33, 0] < -35 and v[263, 0] > 35 and abs(v[33, 1] - v[263, 1]) < 1e-6
    assert v[152, 1] < v[1, 1] < v[33, 1] < v[10, 1]
    assert v[1, 2] > v[33, 2] + 20  # the nose sticks out toward the viewer (+z)
    # The texture map is a frontal unwrap: u grows with x, v (image rows) grows downward.
    assert np.corrcoef(face.uvs[:, 0], v[:, 0])[0, 1] > 0.95
    assert np.corrcoef(face.uvs[:, 1], -v[:, 1])[0, 1] > 0.95


def test_first_vertex_matches_an_independent_decode(raw, face):
    # Independent decode of the first vertex: find the first unpacked vertex_buffer record (tag 0x1d) inside
    # the canonical_mesh message and read five little-endian floats, each preceded by its tag byte.
    assert raw[0] == 0x0A  # field 1, length-delimited
    pos = raw.index(b"\x1d")
    values = [struct.unpack_from("<f", raw, pos + 1 + 5 * k)[0] for k in range(5)]
    assert all(raw[pos + 5 * k] == 0x1D for k in range(5))
    np.testing.assert_allclose(face.vertices_mm[0], np.array(values[:3]) * 10.0, rtol=1e-6)
    np.testing.assert_allclose(face.uvs[0], values[3:], rtol=1e-6)


def test_truncated_and_tampered_buffers_are_refused(raw):
    with pytest.raises(AssetError, match="canonical"):
        parse_canonical_face(raw[: len(raw) // 2], "canonical test")
    with pytest.raises(AssetError):
        parse_canonical_face(raw[:-3], "canonical test")
    # Drop one vertex float record from inside the mesh message and fix the outer length: wrong count.
    pos = raw.index(b"\x1d")
    outer_len_end = 1
    while raw[outer_len_end] & 0x80:
        outer_len_end += 1
    outer_len_end += 1
    old_len = 0
    for shift, byte in enumerate(raw[1:outer_len_end]):
        old_len |= (byte & 0x7F) << (7 * shift)
    new_len = old_len - 5
    encoded = bytearray()
    while True:
        b, new_len = new_len & 0x7F, new_len >> 7
        encoded.append(b | (0x80 if new_len else 0))
        if not new_len:
            break
    tampered = b"\x0a" + bytes(encoded) + raw[outer_len_end:pos] + raw[pos + 5:]
    with pytest.raises(AssetError, match="vertex_buffer holds 2339 floats"):
        parse_canonical_face(tampered, "canonical test")
    # A NaN coordinate is refused.
    nan = bytearray(raw)
    nan[pos + 1:pos + 5] = struct.pack("<f", float("nan"))
    with pytest.raises(AssetError, match="NaN"):
        parse_canonical_face(bytes(nan), "canonical test")


def test_parsed_once_per_process(face):
    assert load_canonical_face(ModelStore()) is face
