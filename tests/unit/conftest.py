"""Fixtures shared by the unit tests of the open pack: its verified model store and its face front end."""

from __future__ import annotations

import pytest

from facefuse.assets.store import ModelStore
from facefuse.face.frontend import FaceFrontEnd


@pytest.fixture(scope="session")
def store() -> ModelStore:
    """The open models, fetched and verified once per session."""
    return ModelStore()


@pytest.fixture(scope="session")
def front_end(store: ModelStore) -> FaceFrontEnd:
    """BlazeFace + FaceMesh with every recovery path on, as the gateway runs them (shared: no test changes it)."""
    return FaceFrontEnd.from_assets(None, store)
