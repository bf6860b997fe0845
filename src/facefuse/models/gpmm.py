"""A Gaussian-process morphable model (GPMM) of face shape on a fixed mesh (Lüthi et al., TPAMI 2018).

Pure math, no file I/O. A face is the template plus a deformation field u: vertices -> R³ drawn from a
zero-mean Gaussian process. The covariance is built from smooth scalar kernels (no training data):

* multi-scale: k(x, x') = Σ_s a_s² exp(−‖x − x'‖² / (2 l_s²)) on 3-D template distance, each
  coordinate of u independent (k·I₃). Long scales move whole regions (size, width), short ones shape
  features;
* bilateral symmetry: with the mirror map m (vertex -> its mirror vertex) and M = diag(−1, 1, 1)
  (the x-reflection), the symmetric part of u is P u with (P u)(x_i) = ½(u(x_i) + M u(x_{m(i)})). The
  covariance is (1 − ρ)·k·I₃ + ρ·2·P (k·I₃) Pᵀ: a fraction ρ of the variance is perfectly mirror-symmetric
  (left and right halves co-vary), the rest is free. Both terms are covariances, so the sum is one.

Because k·I₃ and P act on each coordinate separately, the covariance is block-diagonal per coordinate
(x, y and z): it is eigen-decomposed as two V×V problems (x; y and z share one), exact and fast.
The low-rank model keeps the K largest eigenpairs (Φ orthonormal, Λ) and, as in probabilistic PCA,
treats the discarded variance as isotropic noise σ_r² (the mean of the discarded eigenvalues).

Conditioning on observed vertices y (a subset, per-vertex noise variance σ_v²) is Gaussian in the
coefficients α of u = Φα (prior N(0, Λ)): precision Λ⁻¹ + Φ_oᵀ D⁻¹ Φ_o with D = σ_v² + σ_r² on the
observed coordinates, mean A Φ_oᵀ D⁻¹ (y − μ_o). Samples use the symmetric square root of the posterior
covariance applied to standard normal noise drawn per vertex coordinate (ξ ∈ R^{3V}, η = Φᵀξ): the draw
is then independent of the eigen-solver's choice of signs or of bases inside degenerate eigenspaces (the
y and z blocks are exactly degenerate), so a seed means the same sample on any BLAS up to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MIRROR = np.array([-1.0, 1.0, 1.0])
"""The x-reflection that maps a face onto its mirror image (x = 0 is the mid-sagittal plane)."""


@dataclass(frozen=True)
class KernelScale:
    length_mm: float
    amplitude_mm: float


DEFAULT_SCALES: tuple[KernelScale, ...] = (KernelScale(40.0, 5.0), KernelScale(20.0, 3.0), KernelScale(10.0, 1.5))
"""Chosen, not fitted (no shape data ships in any registry): 5 mm of variation over 40 mm (face size,
width, jaw), 3 mm over 20 mm (cheeks, brow, nose), 1.5 mm over 10 mm (features). Prior standard
deviation per coordinate about 6 mm, the order of adult between-person variation after scale."""
DEFAULT_SYMMETRY = 0.8
"""Fraction ρ of the prior variance that is mirror-symmetric."""
DEFAULT_VARIANCE_FRACTION = 0.98
"""Low-rank truncation: keep eigenpairs until this fraction of the prior variance is explained."""


def mirror_map(template_mm: np.ndarray, tolerance_mm: float = 1.0) -> np.ndarray:
    """(V,) index of each vertex's mirror vertex: nearest neighbour of its x-reflection.

    Raises ValueError when the template is not mirror-symmetric within ``tolerance_mm`` or the map is
    not an involution (m(m(i)) = i), which the symmetric kernel needs.
    """
    from scipy.spatial import cKDTree

    template = np.asarray(template_mm, dtype=np.float64)
    distance, index = cKDTree(template).query(template * MIRROR)
    if distance.max() > tolerance_mm:
        raise ValueError("template is not mirror-symmetric: a reflected vertex lies "
                         f"{distance.max():.3g} mm from any vertex")
    if not np.array_equal(index[index], np.arange(template.shape[0])):
        raise ValueError("the nearest-neighbour mirror map is not an involution")
    return index


def scalar_kernel(template_mm: np.ndarray, scales: Sequence[KernelScale] = DEFAULT_SCALES) -> np.ndarray:
    """(V, V) Σ_s a_s² exp(−d² / 2l_s²) over template vertex distances d (mm²)."""
    template = np.asarray(template_mm, dtype=np.float64)
    sq = np.sum(template**2, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * template @ template.T, 0.0)
    kernel = np.zeros_like(d2)
    for scale in scales:
        if scale.length_mm <= 0 or scale.amplitude_mm < 0:
            raise ValueError(f"kernel scale needs length > 0 and amplitude >= 0, got {scale}")
        kernel += scale.amplitude_mm**2 * np.exp(-d2 / (2.0 * scale.length_mm**2))
    return kernel


def coordinate_covariances(kernel: np.ndarray, mirror: np.ndarray, symmetry: float) -> dict[float, np.ndarray]:
    """The per-coordinate blocks of the covariance, keyed by the mirror sign s (−1 for x, +1 for y and z).

    Block_s = (1 − ρ)K + ρ/2 (K + sΠK + sKΠ + ΠKΠ), Π the mirror permutation.
    """
    if not 0.0 <= symmetry <= 1.0:
        raise ValueError(f"symmetry must lie in [0, 1], got {symmetry}")
    pk = kernel[mirror]  # Π K
    kp = kernel[:, mirror]  # K Π
    pkp = kernel[np.ix_(mirror, mirror)]  # Π K Π
    blocks = {}
    for sign in (-1.0, 1.0):
        block = (1.0 - symmetry) * kernel + 0.5 * symmetry * (kernel + sign * pk + sign * kp + pkp)
        blocks[sign] = 0.5 * (block + block.T)
    return blocks


def full_covariance(template_mm: np.ndarray, scales: Sequence[KernelScale] = DEFAULT_SCALES,
                    symmetry: float = DEFAULT_SYMMETRY, mirror: np.ndarray | None = None) -> np.ndarray:
    """(3V, 3V) prior covariance in mm², rows vertex-major (v0x, v0y, v0z, v1x, ...). For tests and small meshes."""
    mirror = mirror_map(template_mm) if mirror is None else np.asarray(mirror)
    blocks = coordinate_covariances(scalar_kernel(template_mm, scales), mirror, symmetry)
    v = blocks[1.0].shape[0]
    cov = np.zeros((3 * v, 3 * v))
    for c, sign in enumerate(MIRROR):
        cov[c::3, c::3] = blocks[float(sign)]
    return cov


@dataclass
class Posterior:
    """The GP given observations: coefficient mean, covariance (K, K) and its symmetric square root.

    ``coeff_mean`` is (K,) for one set of observations, or (N, K) for N sets observed at the same
    vertices with the same noise: N posteriors that share one covariance (see ``condition``).
    """

    model: GaussianProcessMorphableModel
    coeff_mean: np.ndarray
    coeff_cov: np.ndarray
    coeff_sqrt: np.ndarray

    def mean_mm(self) -> np.ndarray:
        """(V, 3) posterior mean shape, or (N, V, 3) for a batch of posteriors."""
        return self.model.vertices_from_coefficients(self.coeff_mean)

    def vertex_std_mm(self) -> np.ndarray:
        """(V,) root of the summed x/y/z posterior variances of the low-rank part, per vertex."""
        factor = self.model.basis @ self.coeff_sqrt  # (3V, K)
        return np.sqrt((factor**2).sum(axis=1).reshape(-1, 3).sum(axis=1))

    def sample_mm(self, num_samples: int, generator: np.random.Generator) -> np.ndarray:
        """(N, V, 3) samples; noise drawn per vertex coordinate (see the module docstring).

        For a batch of N posteriors, ``num_samples`` must be N: sample i is drawn from posterior i.
        """
        if self.coeff_mean.ndim == 2 and int(num_samples) != self.coeff_mean.shape[0]:
            raise ValueError(f"a batch of {self.coeff_mean.shape[0]} posteriors gives one "
                             f"sample each, not {num_samples}")
        xi = generator.standard_normal((int(num_samples), self.model.basis.shape[0]))
        eta = xi @ self.model.basis  # (N, K): exactly N(0, I) since Φ has orthonormal columns
        coeffs = self.coeff_mean + eta @ self.coeff_sqrt
        return self.model.vertices_from_coefficients(coeffs)


class GaussianProcessMorphableModel:
    """Low-rank GP: vertices = mean + Φα (+ isotropic residual σ_r² outside the span), α ~ N(0, diag(λ))."""

    def __init__(
        self, mean_mm: np.ndarray, basis: np.ndarray, eigenvalues: np.ndarray, residual_variance: float
    ) -> None:
        self.mean_mm = np.asarray(mean_mm, dtype=np.float64)
        self.basis = np.asarray(basis, dtype=np.float64)  # (3V, K), orthonormal columns
        self.eigenvalues = np.asarray(eigenvalues, dtype=np.float64)  # (K,) mm², descending
        self.residual_variance = float(residual_variance)
        self.num_vertices = self.mean_mm.shape[0]
        self.rank = self.basis.shape[1]
        if self.basis.shape[0] != 3 * self.num_vertices or self.eigenvalues.shape != (self.rank,):
            raise ValueError(f"GPMM: basis {self.basis.shape} / eigenvalues {self.eigenvalues.shape} do not fit "
                             f"{self.num_vertices} vertices")
        if np.any(self.eigenvalues <= 0) or self.residual_variance <= 0:
            raise ValueError("GPMM: eigenvalues and the residual variance must be positive")

    @classmethod
    def build(
        cls,
        template_mm: np.ndarray,
        scales: Sequence[KernelScale] = DEFAULT_SCALES,
        symmetry: float = DEFAULT_SYMMETRY,
        *,
        rank: int | None = None,
        variance_fraction: float = DEFAULT_VARIANCE_FRACTION,
        mirror: np.ndarray | None = None,
    ) -> GaussianProcessMorphableModel:
        """Eigen-decompose the prior on ``template_mm`` and keep ``rank`` components (or enough for
        ``variance_fraction``); the kept set never splits an eigenvalue shared by the y and z blocks."""
        template = np.asarray(template_mm, dtype=np.float64)
        num_vertices = template.shape[0]
        mirror = mirror_map(template) if mirror is None else np.asarray(mirror)
        blocks = coordinate_covariances(scalar_kernel(template, scales), mirror, symmetry)
        values: list[np.ndarray] = []
        vectors: list[np.ndarray] = []
        coords: list[np.ndarray] = []
        for c, sign in enumerate(MIRROR):
            w, u = np.linalg.eigh(blocks[float(sign)]) if c < 2 else (values[1], vectors[1])
            values.append(w)
            vectors.append(u)
            coords.append(np.full(w.shape, c))
        all_values = np.concatenate(values)
        # Order: descending eigenvalue; ties (y and z) kept adjacent, y first.
        order = np.lexsort((np.concatenate(coords), -all_values))
        all_values = np.maximum(all_values[order], 0.0)
        total = float(all_values.sum())
        if rank is None:
            if not 0.0 < variance_fraction <= 1.0:
                raise ValueError(f"variance_fraction must lie in (0, 1], got {variance_fraction}")
            rank = int(np.searchsorted(np.cumsum(all_values) / total, variance_fraction) + 1)
        rank = int(min(max(rank, 1), 3 * num_vertices - 1))
        while rank < 3 * num_vertices - 1 and np.isclose(all_values[rank], all_values[rank - 1], rtol=1e-9, atol=0.0):
            rank += 1  # keep degenerate (y, z) pairs together: the truncation is then basis-independent
        basis = np.zeros((3 * num_vertices, rank))
        flat_vectors = np.concatenate(vectors, axis=1)[:, order[:rank]]
        flat_coords = np.concatenate(coords)[order[:rank]]
        for c in range(3):
            cols = np.flatnonzero(flat_coords == c)
            basis[c::3, cols] = flat_vectors[:, cols]
        discarded = all_values[rank:]
        residual = float(discarded.mean()) if discarded.size and discarded.mean() > 0 else 1e-6
        return cls(template, basis, all_values[:rank], max(residual, 1e-6))

    @property
    def explained_fraction(self) -> float:
        total = self.eigenvalues.sum() + self.residual_variance * (self.basis.shape[0] - self.rank)
        return float(self.eigenvalues.sum() / total)

    def vertices_from_coefficients(self, coeffs: np.ndarray) -> np.ndarray:
        """(..., K) -> (..., V, 3) mm."""
        coeffs = np.asarray(coeffs, dtype=np.float64)
        flat = self.mean_mm.reshape(-1) + coeffs @ self.basis.T
        return flat.reshape(*coeffs.shape[:-1], self.num_vertices, 3)

    def coefficients(self, vertices_mm: np.ndarray) -> np.ndarray:
        """Orthogonal projection onto the span: (..., V, 3) -> (..., K)."""
        disp = np.asarray(vertices_mm, dtype=np.float64) - self.mean_mm
        return disp.reshape(*disp.shape[:-2], -1) @ self.basis

    def prior(self) -> Posterior:
        return Posterior(self, np.zeros(self.rank), np.diag(self.eigenvalues), np.diag(np.sqrt(self.eigenvalues)))

    def condition(self, observed_mm: np.ndarray, weights: np.ndarray, noise_mm: float,
                  hidden_noise_mm: float | None = None) -> Posterior:
        """Posterior given the vertices with weight ≥ 0.5 of ``observed_mm`` (V, 3).

        Per-vertex noise variance σ_v² = noise_mm² / w_v (a half-visible vertex counts half) plus the
        residual σ_r² the low-rank span cannot express. Vertices with w < 0.5 are not observed, unless
        ``hidden_noise_mm`` is given: then they are observed with that noise, for observations that guess
        the hidden part (e.g. a landmark network's completion of an image whose hidden pixels were
        replaced). ``observed_mm`` may be (N, V, 3): N observation sets at the same vertices with the same
        noise give N posteriors that share one covariance, for the cost of one.
        """
        observed = np.asarray(observed_mm, dtype=np.float64)
        weights = np.asarray(weights, dtype=np.float64)
        if (
            observed.shape[-2:] != self.mean_mm.shape
            or observed.ndim not in (2, 3)
            or weights.shape != (self.num_vertices,)
        ):
            raise ValueError(
                f"condition: expected ({self.num_vertices}, 3) vertices and ({self.num_vertices},) weights, "
                f"got {observed.shape} and {weights.shape}"
            )
        if noise_mm <= 0:
            raise ValueError(f"condition: noise must be > 0 mm, got {noise_mm}")
        seen = weights >= 0.5
        vertex_variance = noise_mm**2 / np.clip(weights, 0.5, 1.0) + self.residual_variance
        if hidden_noise_mm is not None:
            if hidden_noise_mm <= 0:
                raise ValueError(f"condition: hidden noise must be > 0 mm, got {hidden_noise_mm}")
            vertex_variance = np.where(seen, vertex_variance, hidden_noise_mm**2 + self.residual_variance)
            seen = np.ones_like(seen)
        if not seen.any():  # the prior, once per observation set
            prior = self.prior()
            return Posterior(self, np.zeros((*observed.shape[:-2], self.rank)), prior.coeff_cov, prior.coeff_sqrt)
        rows = (3 * np.flatnonzero(seen)[:, None] + np.arange(3)).reshape(-1)
        variance = np.repeat(vertex_variance[seen], 3)
        sqrt_lambda = np.sqrt(self.eigenvalues)
        whitened = self.basis[rows] * sqrt_lambda / np.sqrt(variance)[:, None]  # D^-1/2 Φ_o Λ^1/2
        precision = np.eye(self.rank) + whitened.T @ whitened  # in whitened coefficients β = Λ^-1/2 α
        w, q = np.linalg.eigh(precision)
        residual = (observed - self.mean_mm).reshape(*observed.shape[:-2], -1)[..., rows] / np.sqrt(variance)
        beta_mean = ((residual @ whitened) @ q / w) @ q.T  # (…, K): Λ^1/2-whitened mean, one row per set
        cov_beta = (q / w) @ q.T
        coeff_cov = sqrt_lambda[:, None] * cov_beta * sqrt_lambda[None, :]
        cw, cq = np.linalg.eigh(0.5 * (coeff_cov + coeff_cov.T))
        coeff_sqrt = (cq * np.sqrt(np.maximum(cw, 0.0))) @ cq.T
        return Posterior(self, sqrt_lambda * beta_mean, coeff_cov, coeff_sqrt)

    def mahalanobis(self, vertices_mm: np.ndarray) -> np.ndarray:
        """(..., V, 3) -> (...,) squared Mahalanobis distance under the prior (PPCA: span + isotropic residual)."""
        disp = (np.asarray(vertices_mm, dtype=np.float64) - self.mean_mm)
        flat = disp.reshape(*disp.shape[:-2], -1)
        coeffs = flat @ self.basis
        residual = flat - coeffs @ self.basis.T
        return (coeffs**2 / self.eigenvalues).sum(axis=-1) + (residual**2).sum(axis=-1) / self.residual_variance
