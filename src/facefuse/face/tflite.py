"""One small wrapper around LiteRT's interpreter: load a ``.tflite`` file, run it, get named outputs.

LiteRT (``ai_edge_litert``, Google's TensorFlow Lite runtime) runs the fp32/fp16 MediaPipe graphs
exactly as published: no conversion step, no TensorFlow. An interpreter is not thread-safe, so each
model serialises its calls with a lock; make one model object per worker thread to run in parallel.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from facefuse.errors import AssetError, InvalidInputError


class TFLiteModel:
    """A loaded ``.tflite`` graph with named inputs and outputs."""

    def __init__(self, path: str | os.PathLike[str], num_threads: int | None = None) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise AssetError(f"running {path} needs the ai-edge-litert package ({exc})") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise AssetError(f"{self.path}: model file not found")
        try:
            self._interpreter = Interpreter(model_path=str(self.path), num_threads=num_threads)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise AssetError(f"{self.path}: not a loadable TFLite model ({exc})") from None
        self.input_details = {d["name"]: d for d in self._interpreter.get_input_details()}
        self.output_details = {d["name"]: d for d in self._interpreter.get_output_details()}
        self._lock = threading.Lock()

    @property
    def input_names(self) -> list[str]:
        return list(self.input_details)

    @property
    def output_names(self) -> list[str]:
        return list(self.output_details)

    def input_shape(self, name: str | None = None) -> tuple[int, ...]:
        detail = self.input_details[name or self.input_names[0]]
        return tuple(int(v) for v in detail["shape"])

    def run(self, inputs: Mapping[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
        """Run once. A bare array feeds the only input; returns copies of every output by name."""
        if isinstance(inputs, np.ndarray):
            if len(self.input_details) != 1:
                raise InvalidInputError(f"{self.path.name} has inputs {self.input_names}; pass them by name")
            inputs = {self.input_names[0]: inputs}
        with self._lock:
            for name, value in inputs.items():
                detail = self.input_details.get(name)
                if detail is None:
                    raise InvalidInputError(f"{self.path.name} has no input {name!r}; inputs: {self.input_names}")
                value = np.ascontiguousarray(value, dtype=detail["dtype"])
                if tuple(value.shape) != tuple(detail["shape"]):
                    raise InvalidInputError(
                        f"{self.path.name} input {name!r}: expected shape {tuple(detail['shape'])}, got {value.shape}"
                    )
                self._interpreter.set_tensor(detail["index"], value)
            self._interpreter.invoke()
            return {name: self._interpreter.get_tensor(d["index"]).copy() for name, d in self.output_details.items()}
