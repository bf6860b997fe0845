"""Real servers on loopback ports: the whole mesh as local processes, and sample photos."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from facefuse.servers.local import LocalMesh


def jpeg_bytes(image: np.ndarray, quality: int = 92) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def astronaut_jpeg() -> bytes:
    import skimage.data

    return jpeg_bytes(skimage.data.astronaut())


@pytest.fixture(scope="session")
def group_photo() -> bytes:
    import insightface

    path = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    return path.read_bytes()


@pytest.fixture(scope="session")
def open_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """The mesh with no assets folder: open front end, model services without a backend yet."""
    with LocalMesh(workdir=tmp_path_factory.mktemp("mesh"), env={"FACEFUSE_ASSETS": ""}) as mesh:
        yield mesh
