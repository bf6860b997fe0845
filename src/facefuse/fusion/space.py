"""A linear shape space, v = template + basis·β: the space every fusion strategy works in.

Shape-only FLAME is exactly this (zero pose, zero expression: V = T + Σ_l β_l S_l, see
``facefuse.models.flame``), so blending vertices and blending β are the same operation, and a
per-vertex blend that is not itself a FLAME shape is brought back to one by least squares
(:meth:`ShapeSpace.project_mm`). The model's arrays are in metres (as FLAME's); what comes out is in
millimetres, float32, as the services send it.

Regions: ``regions`` holds FLAME mask regions (``FLAME_masks.pkl``: face, nose, lips, forehead,
eye_region, left/right_eye_region, ...) plus two derived ones, ``left_cheek`` and ``right_cheek``:
the vertices of ``face`` that lie in none of nose, lips, forehead and the eye regions, split at the
nose's median x (FLAME's +x is the subject's left). They hold the cheeks proper and also the jaw,
chin and temples of that side: FLAME's masks have no finer label for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import scipy.linalg

from facefuse.errors import InvalidInputError
from facefuse.fusion.visibility import MEDIAPIPE_TO_FLAME, Visibility

if TYPE_CHECKING:
    from facefuse.models.flame import FlameModelData

METRES_TO_MM = 1000.0
DEFAULT_RIDGE_MM2 = 1e-3
"""Ridge λ of :meth:`ShapeSpace.project_mm`, in mm². It is the MAP solution under a N(prior, I) prior on β
(FLAME's coefficients are unit-variance) with independent per-coordinate vertex noise of variance λ:
σ ≈ 0.03 mm, i.e. essentially plain least squares, but solvable when weights leave directions unseen."""
_CHEEK_EXCLUDES = ("nose", "lips", "forehead", "eye_region", "left_eye_region", "right_eye_region")


def derive_cheeks(regions: dict[str, np.ndarray], template: np.ndarray) -> dict[str, np.ndarray]:
    """Add ``left_cheek`` / ``right_cheek`` (see the module docstring) when ``face`` is known and they are not."""
    out = {name: np.asarray(idx, dtype=np.int64) for name, idx in regions.items()}
    if "face" not in out or ("left_cheek" in out and "right_cheek" in out):
        return out
    rest = np.setdiff1d(
        out["face"], np.concatenate([out[n] for n in _CHEEK_EXCLUDES if n in out] or [np.zeros(0, np.int64)])
    )
    split = float(np.median(template[out["nose"], 0])) if "nose" in out else 0.0
    out.setdefault("left_cheek", rest[template[rest, 0] > split])
    out.setdefault("right_cheek", rest[template[rest, 0] <= split])
    return out


class ShapeSpace:
    """v = template + basis·β (metres inside, mm out), with faces, a topology id and vertex regions."""

    def __init__(self, template: np.ndarray, basis: np.ndarray, faces: np.ndarray, *,
                 regions: dict[str, np.ndarray] | None = None, topology: str = "flame2020",
                 ridge_mm2: float = DEFAULT_RIDGE_MM2) -> None:
        template = np.asarray(template, dtype=np.float64)
        basis = np.asarray(basis, dtype=np.float64)
        if template.ndim != 2 or template.shape[1] != 3:
            raise InvalidInputError(f"shape space: template must be (V, 3), got {template.shape}")
        if basis.ndim != 3 or basis.shape[:2] != template.shape:
            raise InvalidInputError(f"shape space: basis must be ({template.shape[0]}, 3, K), got {basis.shape}")
        if ridge_mm2 <= 0:
            raise InvalidInputError(f"shape space: ridge must be > 0 mm², got {ridge_mm2}")
        self.num_vertices = int(template.shape[0])
        self.num_coeffs = int(basis.shape[2])
        self.faces = np.asarray(faces, dtype=np.int32)
        self.topology = topology
        self.ridge_mm2 = float(ridge_mm2)
        self._template_mm = template.reshape(-1) * METRES_TO_MM  # (3V,)
        self._basis_mm = basis.reshape(-1, self.num_coeffs) * METRES_TO_MM  # (3V, K), rows vertex-major xyz
        self._basis_sq_norms = (self._basis_mm**2).reshape(self.num_vertices, 3, -1).sum(axis=1)  # (V, K)
        self._gram = self._basis_mm.T @ self._basis_mm  # (K, K)
        self._gram_factor = scipy.linalg.cho_factor(self._gram + self.ridge_mm2 * np.eye(self.num_coeffs))
        self.regions = derive_cheeks(regions or {}, template)
        for name, idx in self.regions.items():
            if idx.size and (idx.min() < 0 or idx.max() >= self.num_vertices):
                raise InvalidInputError(f"shape space: region {name!r} holds vertex indices outside "
                                        f"[0, {self.num_vertices})")

    @classmethod
    def from_flame(
        cls, flame: FlameModelData, regions: dict[str, np.ndarray] | None = None, num_coeffs: int = 300
    ) -> ShapeSpace:
        """FLAME's neutral shape space: the template and the first ``num_coeffs`` identity blendshapes."""
        from facefuse.models.flame import N_SHAPE

        if not 1 <= num_coeffs <= N_SHAPE:
            raise InvalidInputError(f"shape space: num_coeffs must be in [1, {N_SHAPE}], got {num_coeffs}")
        return cls(flame.v_template, flame.shapedirs[:, :, :num_coeffs], flame.faces, regions=regions,
                   topology="flame" + flame.version)

    @property
    def template_mm(self) -> np.ndarray:
        return self._template_mm.reshape(self.num_vertices, 3).astype(np.float32)

    def basis_mm(self) -> np.ndarray:
        """(3V, K) float64 basis in mm per unit coefficient (rows: vertex-major x, y, z)."""
        return self._basis_mm

    def basis_sq_norms_mm(self) -> np.ndarray:
        """(V, K) float64: Σ over x, y, z of the basis squared, mm² per unit coefficient², so that a
        vertex's variance under a diagonal coefficient covariance diag(c) is this @ c."""
        return self._basis_sq_norms

    def check_shape(self, beta: np.ndarray, what: str = "shape") -> np.ndarray:
        """``beta`` as float64 (..., K), or an InvalidInputError that names ``what``."""
        array = np.asarray(beta, dtype=np.float64)
        if array.ndim < 1 or array.shape[-1] != self.num_coeffs:
            raise InvalidInputError(f"{what}: expected (..., {self.num_coeffs}) shape coefficients, got {array.shape}")
        if not np.all(np.isfinite(array)):
            raise InvalidInputError(f"{what}: contains NaN or infinite values")
        return array

    def displacement_mm(self, beta: np.ndarray) -> np.ndarray:
        """basis·β in mm, (..., V, 3) float64 (no template): for spreads and differences."""
        beta = self.check_shape(beta)
        return (beta @ self._basis_mm.T).reshape(*beta.shape[:-1], self.num_vertices, 3)

    def vertices_mm(self, beta: np.ndarray) -> np.ndarray:
        """(..., K) -> (..., V, 3) float32 millimetres."""
        beta = self.check_shape(beta)
        flat = self._template_mm + beta @ self._basis_mm.T
        return flat.reshape(*beta.shape[:-1], self.num_vertices, 3).astype(np.float32)

    def project_mm(self, vertices_mm: np.ndarray, weights: np.ndarray | None = None, *,
                   prior: np.ndarray | None = None) -> np.ndarray:
        """Least-squares β for target vertices (mm): argmin Σ_v w_v‖T_v + S_v β − x_v‖² + λ‖β − prior‖².

        ``weights`` (V,) >= 0 (default all 1); ``prior`` (K,) is where the ridge pulls (default 0, the
        mean face), λ = ``ridge_mm2`` (see :data:`DEFAULT_RIDGE_MM2`). Accepts (V,3) -> (K,) or a batch
        (..., V, 3) -> (..., K); returns float64. The solve is for β − prior, so a target at
        ``vertices_mm(prior)`` returns ``prior`` up to rounding (use :meth:`fit_displacement_mm` for exact zeros).
        """
        target = np.asarray(vertices_mm, dtype=np.float64)
        if target.ndim < 2 or target.shape[-2:] != (self.num_vertices, 3):
            raise InvalidInputError(f"project_mm: expected (..., {self.num_vertices}, 3) vertices "
                                    f"in mm, got {target.shape}")
        if not np.all(np.isfinite(target)):
            raise InvalidInputError("project_mm: vertices contain NaN or infinite values")
        base = np.zeros(self.num_coeffs) if prior is None else self.check_shape(prior, "project_mm prior")
        residual = target - (self._template_mm + base @ self._basis_mm.T).reshape(self.num_vertices, 3)
        return base + self.fit_displacement_mm(residual, weights)

    def fit_displacement_mm(self, displacement_mm: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """Ridge least squares δ for a displacement field (mm): argmin Σ_v w_v‖S_v δ − d_v‖² + λ‖δ‖².

        (..., V, 3) -> (..., K) float64. A zero field gives exactly δ = 0.
        """
        disp = np.asarray(displacement_mm, dtype=np.float64)
        if disp.ndim < 2 or disp.shape[-2:] != (self.num_vertices, 3):
            raise InvalidInputError(f"fit_displacement_mm: expected (..., {self.num_vertices}, "
                                    f"3) in mm, got {disp.shape}")
        batch = disp.shape[:-2]
        flat = disp.reshape(-1, 3 * self.num_vertices)
        if weights is None:
            delta = scipy.linalg.cho_solve(self._gram_factor, (flat @ self._basis_mm).T).T
        else:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (self.num_vertices,) or not np.all(np.isfinite(w)) or np.any(w < 0):
                raise InvalidInputError(f"project_mm: weights must be ({self.num_vertices},) "
                                        f"finite and >= 0, got {w.shape}")
            weighted = self._basis_mm * np.repeat(w, 3)[:, None]
            lhs = self._basis_mm.T @ weighted + self.ridge_mm2 * np.eye(self.num_coeffs)
            delta = scipy.linalg.solve(lhs, (flat @ weighted).T, assume_a="pos").T
        return delta.reshape(*batch, self.num_coeffs)

    def region_weights(self, visibility: Visibility | None, *, smooth_iterations: int = 0) -> np.ndarray:
        """Per-vertex visibility (V,) in [0, 1].

        ``visibility.per_vertex`` of this topology's length is used as is. Otherwise each region's value
        goes to the FLAME regions it governs (:data:`~facefuse.fusion.visibility.MEDIAPIPE_TO_FLAME`; a
        region named like a FLAME region maps to itself); a vertex in several takes the minimum, and every
        other vertex (scalp, neck, ears, or regions no source reported) takes ``visibility.overall``.
        ``smooth_iterations`` averages each vertex with its mesh neighbours that many times (softens seams).
        """
        if visibility is None:
            return np.ones(self.num_vertices, np.float64)
        if visibility.per_vertex is not None and np.shape(visibility.per_vertex) == (self.num_vertices,):
            weights = np.clip(np.asarray(visibility.per_vertex, dtype=np.float64), 0.0, 1.0)
        else:
            weights = np.full(self.num_vertices, np.nan)
            for name, value in visibility.regions.items():
                for target in MEDIAPIPE_TO_FLAME.get(name, (name,)):
                    idx = self.regions.get(target)
                    if idx is None or idx.size == 0:
                        continue
                    v = float(np.clip(value, 0.0, 1.0))
                    weights[idx] = np.where(np.isnan(weights[idx]), v, np.minimum(weights[idx], v))
            weights = np.where(np.isnan(weights), float(np.clip(visibility.overall, 0.0, 1.0)), weights)
        for _ in range(max(0, int(smooth_iterations))):
            weights = self._neighbour_mean(weights)
        return weights

    def _neighbour_mean(self, values: np.ndarray) -> np.ndarray:
        import scipy.sparse

        if not hasattr(self, "_adjacency"):
            f = self.faces.astype(np.int64)
            rows = np.concatenate([f[:, 0], f[:, 1], f[:, 2], f[:, 1], f[:, 2], f[:, 0], np.arange(self.num_vertices)])
            cols = np.concatenate([f[:, 1], f[:, 2], f[:, 0], f[:, 0], f[:, 1], f[:, 2], np.arange(self.num_vertices)])
            adjacency = scipy.sparse.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(self.num_vertices,) * 2)
            adjacency.data[:] = 1.0  # duplicates summed: make it 0/1
            degree = np.asarray(adjacency.sum(axis=1)).ravel()
            self._adjacency = scipy.sparse.diags(1.0 / degree) @ adjacency
        return self._adjacency @ values
