"""Shared fixtures: one folder of synthetic official-format assets per test session (size "small").

Files are written on first request (``synthetic_assets.path("mica")``) so a test only pays for what it
uses, and each file is written at most once per session. ``synthetic_assets_dir`` writes everything
that has a writer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from facefuse.assets.registry import ASSETS, spec
from facefuse.assets.synthetic import WRITERS, synthesize

SYNTHETIC_SIZE = "small"
SYNTHETIC_SEED = 0
OFFICIAL_KEYS = Path(__file__).parent / "data" / "official_keys"


class SyntheticAssets:
    def __init__(self, directory: Path, size: str = SYNTHETIC_SIZE, seed: int = SYNTHETIC_SEED) -> None:
        self.directory = directory
        self.size = size
        self.seed = seed
        self._tried: set[str] = set()

    def path(self, name: str) -> Path:
        """Path of asset ``name`` (registry name or relpath), writing it first if needed."""
        relpath = spec(name).relpath if name not in WRITERS else name
        target = self.directory / relpath
        if relpath not in self._tried:
            self._tried.add(relpath)
            synthesize(self.directory, size=self.size, seed=self.seed, only={relpath})
        if not target.is_file():
            pytest.skip(f"no synthetic writer available for {relpath}")
        return target

    def ensure_all(self) -> Path:
        """Every required file (optional ones change what a pack does: a test asks for them by name)."""
        optional = {a.relpath for a in ASSETS if a.optional}
        for relpath in WRITERS:
            if relpath not in self._tried and relpath not in optional:
                self._tried.add(relpath)
                synthesize(self.directory, size=self.size, seed=self.seed, only={relpath})
        return self.directory


@pytest.fixture(scope="session")
def synthetic_assets(tmp_path_factory: pytest.TempPathFactory) -> SyntheticAssets:
    return SyntheticAssets(tmp_path_factory.mktemp("synthetic-assets"))


@pytest.fixture(scope="session")
def synthetic_assets_dir(synthetic_assets: SyntheticAssets) -> Path:
    return synthetic_assets.ensure_all()


def read_official_keys(name: str) -> list[tuple[str, tuple[int, ...], str]]:
    """Rows (key, shape, dtype) of ``tests/data/official_keys/<name>.tsv``."""
    rows = []
    for line in (OFFICIAL_KEYS / f"{name}.tsv").read_text().splitlines():
        if not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        dims = tuple(int(d) for d in shape.strip("()").replace(" ", "").split(",") if d)
        rows.append((key, dims, dtype))
    return rows


@pytest.fixture(scope="session")
def official_keys():
    """``official_keys("mica_arcface")`` -> [(key, shape, dtype name)] from the tsv dumps."""
    return read_official_keys


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--compose",
        action="store_true",
        help="also collect tests/compose: build the images and run the mesh in containers (make test-compose)",
    )


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/compose builds images and starts containers: only with --compose, never in `make test`."""
    if collection_path.name == "compose" and collection_path.parent == Path(__file__).parent:
        return not config.getoption("--compose")
    return None
