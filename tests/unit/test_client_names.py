"""Output folder names come from the client's own input names: safe, bounded, unique, stable."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from facefuse import wire
from facefuse.client.names import display, folder_name
from facefuse.client.validate import InvalidResponseError, check_numbers, tensor, text
from facefuse.v1 import common_pb2, gateway_pb2

HOSTILE = ["a#1.jpg", "a_1.jpg", "sub/x.jpg", "sub__x.jpg", "../../etc/passwd", "/abs/path.png", ".", "..", "",
           ".hidden.png", "x" * 5000, "nul\x00byte", "tab\tand\nnewline", os.fsdecode(b"caf\xe9.png"), "café.png",
           "clip.mp4#000010", "clip.mp4_000010"]


def test_folder_names_are_one_safe_bounded_component_each() -> None:
    names = [folder_name(n) for n in HOSTILE]
    assert len(set(names)) == len(HOSTILE)  # every collision of the old scheme is gone
    for name in names:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", name), name
        assert not name.startswith(".") and name not in (".", "..") and len(name) < 80


def test_folder_names_are_stable_so_reruns_resume() -> None:
    # A changed scheme would make every existing OUT folder look unfinished: pin one value.
    assert folder_name("photos/a#1.jpg") == "photos_a_1.jpg-31c77f24a5033541"
    assert folder_name(os.fsdecode(b"caf\xe9.png")) != folder_name("caf\\xe9.png")  # same display, other bytes


def test_display_is_json_safe_for_undecodable_bytes() -> None:
    shown = display(os.fsdecode(b"in/caf\xe9.png"))
    assert shown == "in/caf\\xe9.png"
    json.dumps(shown, ensure_ascii=False).encode("utf-8")  # no lone surrogate left


def test_server_text_is_printable_and_short() -> None:
    assert text("a\x00b\nc") == "a?b?c"
    assert len(text("y" * 10_000)) <= 203


@pytest.mark.parametrize(("index", "count", "code"), [(-1, 0, 0), (1, 1, 0), (-2, 3, 0), (0, 10**6, 0), (5, -1, 3)])
def test_impossible_face_numbers_are_refused(index: int, count: int, code: int) -> None:
    result = gateway_pb2.FaceResult(face_index=index, num_faces=count, status=common_pb2.Status(code=code))
    with pytest.raises(InvalidResponseError):
        check_numbers(result)


def test_a_tensor_shape_is_checked_before_anything_is_decoded() -> None:
    message = wire.from_numpy(np.zeros((2, 3), np.float32))
    del message.shape[:]
    message.shape.extend([2**62, 2**62])
    with pytest.raises(InvalidResponseError, match="shape"):
        tensor(message, "t", (None, 3), (common_pb2.FLOAT32,), max_dim=100)
    good = tensor(wire.from_numpy(np.ones((2, 3), np.float32)), "t", (None, 3), (common_pb2.FLOAT32,), max_dim=100)
    assert good.shape == (2, 3)
    with pytest.raises(InvalidResponseError, match="beyond"):
        tensor(
            wire.from_numpy(np.full((2, 3), 1e9, np.float32)),
            "t",
            (None, 3),
            (common_pb2.FLOAT32,),
            max_dim=100,
            max_abs=1e5,
        )
