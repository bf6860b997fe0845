"""End-to-end fixtures: the mesh over synthetic official-format assets (size "small")."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from facefuse.packs.flame import NUMERICS_ENV, NUMERICS_MODES, OferBackend
from facefuse.servers.local import LocalMesh


@pytest.fixture(scope="session")
def astronaut_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import skimage.data
    from PIL import Image

    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(path)
    return path


@pytest.fixture(params=NUMERICS_MODES)
def ofer_backend_per_numerics(request: pytest.FixtureRequest, synthetic_assets_dir: Path,
                              monkeypatch: pytest.MonkeyPatch) -> OferBackend:
    """The flame pack's OFER backend in each numerics mode, for claims that must hold in all of them."""
    monkeypatch.setenv(NUMERICS_ENV, request.param)
    backend = OferBackend.from_assets(synthetic_assets_dir, "cpu")
    assert backend.status.details["numerics"] == request.param
    return backend


@pytest.fixture(scope="session")
def mica_assets(synthetic_assets) -> Path:
    for name in ("flame2020", "landmark_embedding", "flame_masks", "mica"):
        synthetic_assets.path(name)
    return synthetic_assets.directory


@pytest.fixture(scope="session")
def flame_mesh(synthetic_assets_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """The whole mesh on the flame pack, every official file a synthetic stand-in (size small)."""
    with LocalMesh(assets=synthetic_assets_dir, workdir=tmp_path_factory.mktemp("flame-mesh")) as mesh:
        yield mesh


@pytest.fixture
def service_torch_threads() -> Iterator[int]:
    """Torch in this test process runs with the thread count the local mesh's services use
    (``--torch-threads auto``): a thread count changes float rounding, so bit-for-bit comparisons of a
    service's answer with an in-process call need the same count."""
    import torch

    from facefuse.servers.threads import parse_torch_threads

    before = torch.get_num_threads()
    threads = parse_torch_threads("auto")
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)
