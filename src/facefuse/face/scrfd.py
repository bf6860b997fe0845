"""SCRFD-10GF with 5 key-points (insightface antelopev2 ``scrfd_10g_bnkps.onnx``), run by insightface.

Exactly the official call (§1.1): ``SCRFD(model_file)``, ``prepare(ctx_id=-1, input_size=(224, 224),
det_thresh=0.4, nms_thresh=0.4)`` on the CPU execution provider, ``detect(img_bgr, input_size=(224,
224), max_num=0, metric="default")``. insightface expects BGR pixels, so RGB input is reversed here.

``validate_scrfd_model`` is the asset registry's validator: it checks the graph's signature without
running the network.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from facefuse.errors import AssetError
from facefuse.face.types import Detection

DET_SIZE = (224, 224)
DET_THRESH = 0.4
NMS_THRESH = 0.4
STRIDES = (8, 16, 32)
_OUTPUT_WIDTHS = {"score": 1, "bbox": 4, "kps": 10}


def validate_scrfd_model(path: Path) -> str:
    """Check that ``path`` is an SCRFD-10GF-bnkps ONNX graph; return a one-line description.

    Signature: one float input ``input.1`` of shape (1, 3, H, W) (H, W dynamic or fixed), and 9
    outputs in the order score 8/16/32, bbox 8/16/32, kps 8/16/32, each (N, C) or (1, N, C) with
    C = 1, 4, 10. Raises ``AssetError`` naming the first difference.
    """
    path = Path(path)
    if not path.is_file():
        raise AssetError(f"{path}: file not found")
    try:
        import onnx
    except ImportError:  # pragma: no cover - onnx comes with insightface
        raise AssetError(f"{path}: checking an ONNX graph needs the onnx package") from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and various others for non-ONNX bytes
        raise AssetError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializers]
    if len(inputs) != 1:
        raise AssetError(f"{path}: SCRFD has one input 'input.1', this graph has {[v.name for v in inputs]}")
    if inputs[0].name != "input.1":
        raise AssetError(f"{path}: SCRFD's input is named 'input.1', this graph's is {inputs[0].name!r}")
    dims = _dims(inputs[0])
    if len(dims) != 4 or dims[0] not in (1, None) or dims[1] != 3:
        raise AssetError(f"{path}: SCRFD's input is (1, 3, H, W); this graph's is {_show(dims)}")
    outputs = list(graph.output)
    if len(outputs) != 9:
        raise AssetError(
            f"{path}: SCRFD-10GF-bnkps has 9 outputs (score, bbox, kps for strides 8/16/32); this graph has "
            f"{len(outputs)} ({[o.name for o in outputs]})"
        )
    fixed = [d for d in dims[2:] if d is not None]
    for index, output in enumerate(outputs):
        kind = ("score", "bbox", "kps")[index // 3]
        stride = STRIDES[index % 3]
        out_dims = _dims(output)
        if len(out_dims) not in (2, 3) or (len(out_dims) == 3 and out_dims[0] not in (1, None)):
            raise AssetError(f"{path}: output {index} ({output.name!r}, {kind} stride {stride}) should be (N, "
                             f"{_OUTPUT_WIDTHS[kind]}), is {_show(out_dims)}")
        if out_dims[-1] != _OUTPUT_WIDTHS[kind]:
            raise AssetError(f"{path}: output {index} ({output.name!r}) should be the stride-{stride} {kind} map with "
                             f"{_OUTPUT_WIDTHS[kind]} values per anchor, has {_show(out_dims)}")
        if len(fixed) == 2 and out_dims[-2] is not None:
            expected = (fixed[0] // stride) * (fixed[1] // stride) * 2
            if out_dims[-2] != expected:
                raise AssetError(f"{path}: output {index} ({output.name!r}) should have {expected} anchors for a "
                                 f"{dims[2]}x{dims[3]} input at stride {stride}, has {out_dims[-2]}")
    size = "dynamic" if len(fixed) < 2 else f"{dims[2]}x{dims[3]}"
    return f"SCRFD-10GF-bnkps detector ONNX (input 'input.1' 1x3x{size}, 9 outputs), {path.stat().st_size} bytes"


def _dims(value) -> list[int | None]:
    return [int(d.dim_value) if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]


def _show(dims: list[int | None]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"


class ScrfdDetector:
    """insightface's SCRFD on the CPU with gen_mod's settings; returns ``Detection`` objects."""

    name = "scrfd"

    def __init__(self, model_file: str | os.PathLike[str], det_thresh: float = DET_THRESH,
                 nms_thresh: float = NMS_THRESH, det_size: tuple[int, int] = DET_SIZE) -> None:
        validate_scrfd_model(Path(model_file))
        from insightface.model_zoo.scrfd import SCRFD

        try:
            self._model = SCRFD(model_file=str(model_file))
            self._model.prepare(ctx_id=-1, input_size=det_size, det_thresh=det_thresh, nms_thresh=nms_thresh)
        except Exception as exc:  # onnxruntime raises its own exception types for broken graphs
            raise AssetError(f"{model_file}: onnxruntime cannot run this SCRFD model ({exc})") from None
        self.det_size = det_size
        self.det_thresh = det_thresh

    def detect_arrays(self, image_rgb: np.ndarray, det_thresh: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """insightface's raw result: boxes (K, 5) [x1, y1, x2, y2, score] and key-points (K, 5, 2).

        ``det_thresh`` overrides the prepared threshold for this call only (insightface's ``detect``
        takes it per call, so concurrent calls with different thresholds do not interfere)."""
        bgr = np.ascontiguousarray(np.asarray(image_rgb)[:, :, ::-1])
        extra = {} if det_thresh is None else {"det_thresh": float(det_thresh)}
        boxes, kpss = self._model.detect(bgr, input_size=self.det_size, max_num=0, metric="default", **extra)
        if kpss is None:
            kpss = np.zeros((len(boxes), 5, 2), np.float32)
        return boxes, kpss

    def detect(self, image_rgb: np.ndarray, det_thresh: float | None = None) -> list[Detection]:
        boxes, kpss = self.detect_arrays(image_rgb, det_thresh)
        return [Detection(box=b[:4], score=float(b[4]), kps5=k, landmarks=None, detector=self.name)
                for b, k in zip(boxes, kpss, strict=True)]
