"""SCRFD through the real insightface code path, on a synthetic ONNX graph with the official signature.

The graph: for each stride s in 8/16/32, an s x s average pool of the input blob, then 1x1 convolutions
giving 2 anchors x (1 score | 4 box distances | 10 key-point offsets) per cell, laid out (N, C) exactly
as the official export (NCHW -> NHWC -> reshape). Only stride 32 can fire: its score is
sigmoid(10 * R - 5) where R is the blob's first channel (red, after insightface's BGR->RGB swap); its
box and key-point outputs are constants, so the expected detection follows from insightface's
documented decoding (anchor centre = cell * stride; distances * stride).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from facefuse.errors import AssetError
from facefuse.face.scrfd import ScrfdDetector, validate_scrfd_model

BOX_DIST = 2.0  # box half-size in stride units (64 px at stride 32)
KPS_OFFSETS = np.array([[-0.6, -0.4], [0.6, -0.4], [0.0, 0.1], [-0.5, 0.8], [0.5, 0.8]])


def build_scrfd_like(path: Path, *, n_outputs: int = 9, input_name: str = "input.1", bbox_width: int = 4) -> Path:
    nodes, inits, outputs = [], [], {"score": [], "bbox": [], "kps": []}
    for stride in (8, 16, 32):
        pooled = f"pool{stride}"
        nodes.append(helper.make_node("AveragePool", [input_name], [pooled], kernel_shape=[stride, stride],
                                      strides=[stride, stride]))
        for kind, width in (("score", 1), ("bbox", bbox_width), ("kps", 10)):
            weight = np.zeros((2 * width, 3, 1, 1), np.float32)
            bias = np.zeros(2 * width, np.float32)
            if kind == "score":
                bias[:] = -5.0 if stride == 32 else -20.0
                if stride == 32:
                    weight[:, 0] = 10.0  # blob channel 0 = red
            elif kind == "bbox":
                bias[:] = BOX_DIST
            else:
                bias[:] = np.tile(KPS_OFFSETS.reshape(-1), 2)
            inits += [
                numpy_helper.from_array(weight, f"{kind}{stride}_w"),
                numpy_helper.from_array(bias, f"{kind}{stride}_b"),
            ]
            conv, last = f"{kind}{stride}_conv", f"{kind}{stride}_conv"
            nodes.append(helper.make_node("Conv", [pooled, f"{kind}{stride}_w", f"{kind}{stride}_b"], [conv]))
            if kind == "score":
                nodes.append(helper.make_node("Sigmoid", [conv], [f"{kind}{stride}_sig"]))
                last = f"{kind}{stride}_sig"
            nodes.append(helper.make_node("Transpose", [last], [f"{kind}{stride}_t"], perm=[0, 2, 3, 1]))
            inits.append(numpy_helper.from_array(np.array([-1, width], np.int64), f"{kind}{stride}_shape"))
            out_name = f"{kind}_{stride}"
            nodes.append(helper.make_node("Reshape", [f"{kind}{stride}_t", f"{kind}{stride}_shape"], [out_name]))
            outputs[kind].append(helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [f"n{stride}", width]))
    ordered = outputs["score"] + outputs["bbox"] + outputs["kps"]
    graph = helper.make_graph(
        nodes, "scrfd_like",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [1, 3, "h", "w"])],
        ordered[:n_outputs], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def scrfd_file(tmp_path_factory) -> Path:
    return build_scrfd_like(tmp_path_factory.mktemp("scrfd") / "scrfd_10g_bnkps.onnx")


def _expected_score() -> float:
    red = (255 - 127.5) / 128.0  # insightface's blob: (p - 127.5) / 128
    return float(1.0 / (1.0 + np.exp(-(10.0 * red - 5.0))))


def test_validator_accepts_official_signature(scrfd_file):
    assert "SCRFD" in validate_scrfd_model(scrfd_file)


def test_detects_the_known_face_with_insightface_decoding(scrfd_file):
    image = np.zeros((224, 224, 3), np.uint8)
    image[64:96, 96:128] = (255, 0, 0)  # RGB red: stride-32 cell (col 3, row 2), anchor centre (96, 64)
    detections = ScrfdDetector(scrfd_file).detect(image)
    assert len(detections) == 1  # the cell's two anchors are merged by NMS
    det = detections[0]
    anchor = np.array([96.0, 64.0])
    d = BOX_DIST * 32
    np.testing.assert_allclose(det.box, [anchor[0] - d, anchor[1] - d, anchor[0] + d, anchor[1] + d], atol=1e-3)
    np.testing.assert_allclose(det.kps5, anchor + KPS_OFFSETS * 32, atol=1e-3)
    assert det.score == pytest.approx(_expected_score(), rel=1e-5)
    assert det.detector == "scrfd" and det.landmarks is None


def test_rescales_to_input_pixels_and_keeps_channel_order(scrfd_file):
    detector = ScrfdDetector(scrfd_file)
    # 448 x 336 image -> resized by 0.5 into the 224 canvas; the red block lands on the same cell.
    image = np.zeros((336, 448, 3), np.uint8)
    image[128:192, 192:256] = (255, 0, 0)
    (det,) = detector.detect(image)
    anchor = np.array([96.0, 64.0]) / 0.5
    d = BOX_DIST * 32 / 0.5
    np.testing.assert_allclose(det.box, [anchor[0] - d, anchor[1] - d, anchor[0] + d, anchor[1] + d], atol=1e-2)
    np.testing.assert_allclose(det.kps5, anchor + KPS_OFFSETS * 32 / 0.5, atol=1e-2)
    # Blue is not red: if RGB were passed to insightface unswapped, this would fire and red would not.
    image[:] = 0
    image[128:192, 192:256] = (0, 0, 255)
    assert detector.detect(image) == []


def test_threshold_is_applied(scrfd_file):
    image = np.zeros((224, 224, 3), np.uint8)
    image[64:96, 96:128] = (110, 0, 0)  # blob red = -0.137 -> score sigmoid(-6.37) << 0.4
    assert ScrfdDetector(scrfd_file).detect(image) == []


def test_validator_rejects_six_outputs(tmp_path):
    path = build_scrfd_like(tmp_path / "no_kps.onnx", n_outputs=6)
    with pytest.raises(AssetError, match="9 outputs"):
        validate_scrfd_model(path)


def test_validator_rejects_wrong_input_name(tmp_path):
    path = build_scrfd_like(tmp_path / "renamed.onnx", input_name="images")
    with pytest.raises(AssetError, match=r"input\.1"):
        validate_scrfd_model(path)


def test_validator_rejects_wrong_bbox_width(tmp_path):
    path = build_scrfd_like(tmp_path / "bbox5.onnx", bbox_width=5)
    with pytest.raises(AssetError, match="bbox"):
        validate_scrfd_model(path)


def test_validator_rejects_non_onnx(tmp_path):
    path = tmp_path / "scrfd_10g_bnkps.onnx"
    path.write_bytes(b"\x00not an onnx file" * 10)
    with pytest.raises(AssetError, match="ONNX"):
        validate_scrfd_model(path)
    with pytest.raises(AssetError, match="not found"):
        validate_scrfd_model(tmp_path / "missing.onnx")


def test_threshold_per_call_overrides_the_prepared_one(scrfd_file):
    """``--det-thresh`` / ProcessOptions.det_thresh reach SCRFD per call, leaving the prepared default alone."""
    image = np.zeros((224, 224, 3), np.uint8)
    image[64:96, 96:128] = (255, 0, 0)
    detector = ScrfdDetector(scrfd_file)
    score = _expected_score()  # about 0.99
    assert len(detector.detect(image, det_thresh=score - 0.01)) == 1
    assert detector.detect(image, det_thresh=min(score + 0.005, 0.9999)) == []
    assert len(detector.detect(image)) == 1  # the prepared 0.4 again
