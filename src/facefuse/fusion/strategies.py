"""Fusion strategies: named, selectable objects with one interface, all evaluated the same way.

Every strategy maps (MICA's shape, OFER's samples and IdRank scores, visibility) to a
:class:`FusionResult`: a FLAME shape, its vertices in mm (always ``space.vertices_mm(shape)``, so every
output is a valid shape of the space), a per-vertex spread in mm and a confidence in [0, 1]. Nothing
here draws random numbers: the same inputs give the same output, bit for bit.

What the per-vertex spread means (mm, root of the summed x/y/z variances at that vertex):

* selection strategies (``ofer``, ``pool``, ``sdedit``, ``guided``): the spread of the candidate
  samples around their mean, i.e. how much the generator's answers disagree at that vertex;
* ``linear``: (1 − w) × that spread (the part of the output that comes from the samples);
* ``region``: the spread of the region blend had each sample been OFER's pick (exact, the blend and
  the projection are linear), so it vanishes where MICA is trusted;
* ``gaussian``: the posterior standard deviation of the fused Gaussian, pushed to the vertices;
* ``mica``: MICA reports no uncertainty; when samples are given, the RMS distance between them and
  MICA's vertices (where the two branches disagree), else zeros.

Confidence (a heuristic, not calibrated on real data): exp(−s̄ / 2 mm) × (0.5 + 0.5·v), with s̄ the
mean spread over the face-region vertices (all vertices if the space has no ``face`` region) and v
the overall visibility (1 when none is given).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import scipy.linalg

from facefuse.errors import InvalidInputError
from facefuse.fusion.space import ShapeSpace
from facefuse.fusion.visibility import Visibility

CONFIDENCE_SCALE_MM = 2.0
NUM_TRAIN_STEPS = 1000  # IdGen's schedule length (facefuse.models.diffusion.NUM_TRAIN_STEPS)
SDEDIT_T_MIN = 100
SDEDIT_T_MAX = 600
GUIDED_MAX_STRENGTH = 0.1
_INPUT_HELP = {
    "mica_shape": "mica_shape (MICA's FLAME shape, (K,))",
    "samples": "samples (OFER's sampled shapes, (N, K))",
    "scores": "scores (IdRank scores of the samples, (N,))",
}


@dataclass
class FusionInputs:
    mica_shape: np.ndarray | None  # (K,)
    samples: np.ndarray | None  # (N, K)
    scores: np.ndarray | None  # (N,) raw IdRank scores of samples (for 'pool', the last row of samples is MICA's shape)
    visibility: Visibility | None = None
    options: dict[str, float] = field(default_factory=dict)


@dataclass
class FusionResult:
    shape: np.ndarray  # (K,) float32
    vertices_mm: np.ndarray  # (V, 3) float32
    vertex_spread_mm: np.ndarray  # (V,) float32
    confidence: float  # [0, 1]
    strategy: str


def _visibility_value(visibility: Visibility | float | None) -> float:
    if visibility is None:
        return 1.0
    value = visibility.overall if isinstance(visibility, Visibility) else float(visibility)
    if not np.isfinite(value):
        raise InvalidInputError(f"visibility: expected a number in [0, 1], got {value}")
    return float(np.clip(value, 0.0, 1.0))


def sdedit_t0(visibility: Visibility | float | None, t_min: int = SDEDIT_T_MIN, t_max: int = SDEDIT_T_MAX) -> int:
    """SDEdit start step for IdGen: t0 = round(t_min + (1 − v)·(t_max − t_min)), v the overall visibility.

    A fully visible face keeps most of MICA's shape (t0 = 100: ᾱ ≈ 0.86, the start is 0.93·MICA plus
    0.37 of noise, in units of FLAME's unit-variance coefficients); a fully occluded one starts from
    t0 = 600 (ᾱ ≈ 0.19: mostly noise), letting the generator re-imagine the shape. Chosen, not tuned
    on real faces. Convention of ``facefuse.models.diffusion``: t0 steps of forward noise, 0..1000.
    """
    if not 0 <= t_min <= t_max <= NUM_TRAIN_STEPS:
        raise InvalidInputError(f"sdedit_t0: need 0 <= t_min <= t_max <= {NUM_TRAIN_STEPS}, got {t_min}, {t_max}")
    v = _visibility_value(visibility)
    return round(t_min + (1.0 - v) * (t_max - t_min))


def guided_strength(visibility: Visibility | float | None, max_strength: float = GUIDED_MAX_STRENGTH) -> float:
    """Per-step pull of x̂₀ toward MICA's shape: strength = max_strength · v (v the overall visibility).

    The pull is applied at every sampler step (x̂₀ ← lerp(x̂₀, MICA, s)), so it compounds: with 50 DDIM
    steps a per-step 0.1 already brings the samples most of the way to MICA. Chosen by hand; the
    controlled study (benchmarks/study_fusion.py) evaluates it but did not tune it.
    """
    if not 0.0 <= max_strength <= 1.0:
        raise InvalidInputError(f"guided_strength: max_strength must lie in [0, 1], got {max_strength}")
    return float(max_strength * _visibility_value(visibility))


# --------------------------------------------------------------------------- checked inputs


@dataclass
class _Checked:
    mica: np.ndarray | None
    samples: np.ndarray | None
    scores: np.ndarray | None
    visibility: Visibility | None
    options: dict[str, float]

    @property
    def v(self) -> float:
        return _visibility_value(self.visibility)


def _check_inputs(
    name: str, needs: tuple[str, ...], inputs: FusionInputs, space: ShapeSpace, min_samples: int
) -> _Checked:
    missing = [key for key in needs if getattr(inputs, key) is None]
    if missing:
        raise InvalidInputError(
            f"fusion strategy {name!r} needs " + ", ".join(_INPUT_HELP[k] for k in needs)
            + "; missing: " + ", ".join(missing))
    mica = None if inputs.mica_shape is None else space.check_shape(inputs.mica_shape, "mica_shape")
    if mica is not None and mica.ndim != 1:
        raise InvalidInputError(f"mica_shape: expected ({space.num_coeffs},), got {mica.shape}")
    samples = scores = None
    if inputs.samples is not None:
        samples = space.check_shape(inputs.samples, "samples")
        if samples.ndim != 2 or samples.shape[0] < 1:
            raise InvalidInputError(f"samples: expected (N >= 1, {space.num_coeffs}), got {samples.shape}")
    if samples is not None and "samples" in needs and samples.shape[0] < min_samples:
        raise InvalidInputError(
            f"fusion strategy {name!r} needs at least {min_samples} samples, got {samples.shape[0]}"
        )
    if inputs.scores is not None:
        scores = np.asarray(inputs.scores, dtype=np.float64).reshape(-1)
        if samples is None or scores.shape != (samples.shape[0],):
            raise InvalidInputError(
                f"scores: expected one score per sample ({0 if samples is None else samples.shape[0]},), "
                f"got {np.shape(inputs.scores)}"
            )
        if not np.all(np.isfinite(scores)):
            raise InvalidInputError("scores: contains NaN or infinite values")
    options = {}
    for key, value in (inputs.options or {}).items():
        try:
            options[str(key)] = float(value)
        except (TypeError, ValueError):
            raise InvalidInputError(f"fusion option {key!r}: expected a number, got {value!r}") from None
    return _Checked(mica, samples, scores, inputs.visibility, options)


def _best(scores: np.ndarray) -> int:
    """IdRank's pick: argmax of the raw scores (the first on ties)."""
    return int(np.argmax(scores))


def _rms_spread(space: ShapeSpace, shapes: np.ndarray, centre: np.ndarray | None = None) -> np.ndarray:
    """Per-vertex sqrt(mean_i ‖x_i,v − c_v‖²) in mm; c = the mean of ``shapes`` unless given. (V,) float64."""
    if shapes.shape[0] == 0:
        return np.zeros(space.num_vertices)
    centre = shapes.mean(axis=0) if centre is None else centre
    disp = space.displacement_mm(shapes - centre)  # (N, V, 3): linear, so no template needed
    return np.sqrt((disp**2).sum(axis=-1).mean(axis=0))


def _confidence(space: ShapeSpace, spread: np.ndarray, visibility: float) -> float:
    face = space.regions.get("face")
    mean_spread = float(spread[face].mean()) if face is not None and face.size else float(spread.mean())
    value = np.exp(-mean_spread / CONFIDENCE_SCALE_MM) * (0.5 + 0.5 * visibility)
    return float(np.clip(value, 0.0, 1.0))


# --------------------------------------------------------------------------- strategies


@dataclass(frozen=True)
class SamplerSteering:
    """How a strategy wants the generative branch run, so the gateway need not know strategy names.

    ``mica_first``: MICA's shape is needed before sampling (the branches run one after the other);
    ``start_t0``: start the reverse diffusion from MICA's shape noised to this step (SDEdit);
    ``guide_strength``: pull every step's x̂₀ toward MICA's shape this hard; ``mica_in_pool``: MICA's
    shape joins the candidates IdRank scores, as the last row.
    """

    mica_first: bool = False
    start_t0: int | None = None
    guide_strength: float | None = None
    mica_in_pool: bool = False


class FusionStrategy:
    """One way to fuse. Constructors take only keyword overrides of ``defaults`` (the same for all)."""

    name: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[dict[str, float]] = {}
    min_samples: ClassVar[int] = 1
    summary: ClassVar[str] = ""

    def __init__(self, **overrides: float) -> None:
        unknown = sorted(set(overrides) - set(self.defaults))
        if unknown:
            raise InvalidInputError(f"fusion strategy {self.name!r}: unknown option(s) {unknown}; "
                                    f"known: {sorted(self.defaults)}")
        self.params = {**self.defaults, **{k: float(v) for k, v in overrides.items()}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self.params.items())})"

    def __call__(self, inputs: FusionInputs, space: ShapeSpace) -> FusionResult:
        checked = _check_inputs(self.name, self.needs, inputs, space, self.min_samples)
        unknown = sorted(set(checked.options) - set(self.params))
        if unknown:
            raise InvalidInputError(
                f"fusion strategy {self.name!r}: unknown option(s) {unknown}; known: {sorted(self.params) or 'none'}")
        options = {**self.params, **checked.options}
        shape, spread = self.fuse(checked, options, space)
        shape = np.asarray(shape, dtype=np.float32)
        return FusionResult(shape=shape, vertices_mm=space.vertices_mm(shape),
                            vertex_spread_mm=np.asarray(spread, dtype=np.float32),
                            confidence=_confidence(space, spread, checked.v), strategy=self.name)

    def fuse(self, x: _Checked, options: dict[str, float], space: ShapeSpace) -> tuple[np.ndarray, np.ndarray]:
        """(shape (K,), spread (V,) mm) from validated inputs."""
        raise NotImplementedError

    def steering(self, options: dict[str, float], visibility: float) -> SamplerSteering:
        """How the sampler and ranker must run for this strategy (default: independent of MICA)."""
        return SamplerSteering()


class MicaStrategy(FusionStrategy):
    name = "mica"
    needs = ("mica_shape",)
    summary = "MICA's shape as is."

    def fuse(self, x, options, space):
        spread = _rms_spread(space, x.samples, x.mica) if x.samples is not None else np.zeros(space.num_vertices)
        return x.mica, spread


class OferStrategy(FusionStrategy):
    name = "ofer"
    needs = ("samples", "scores")
    summary = "IdRank's best of OFER's samples."

    def fuse(self, x, options, space):
        return x.samples[_best(x.scores)], _rms_spread(space, x.samples)


class LinearStrategy(FusionStrategy):
    name = "linear"
    needs = ("mica_shape", "samples", "scores")
    defaults: ClassVar[dict[str, float]] = {"w": 0.5}
    summary = "w·MICA + (1 − w)·IdRank's pick (the seed project's blend; w = 0 is 'ofer', w = 1 is 'mica')."

    def fuse(self, x, options, space):
        w = options["w"]
        if not 0.0 <= w <= 1.0:
            raise InvalidInputError(f"fusion strategy 'linear': option w must lie in [0, 1], got {w}")
        pick = x.samples[_best(x.scores)]
        if w == 1.0:
            shape = x.mica.copy()
        elif w == 0.0:
            shape = pick.copy()
        else:
            shape = w * x.mica + (1.0 - w) * pick
        return shape, (1.0 - w) * _rms_spread(space, x.samples)


class PoolStrategy(FusionStrategy):
    name = "pool"
    needs = ("samples", "scores")
    min_samples = 2
    summary = "MICA's shape joins the pool IdRank ranks (it is the last candidate); the top-scored candidate wins."

    def steering(self, options, visibility):
        return SamplerSteering(mica_first=True, mica_in_pool=True)

    def fuse(self, x, options, space):
        last = x.samples.shape[0] - 1
        if x.mica is not None and not np.allclose(x.samples[last], x.mica, rtol=0.0, atol=1e-5):
            raise InvalidInputError(
                "fusion strategy 'pool': the last row of samples must be MICA's shape (the gateway appends it), "
                f"but it differs from mica_shape by up to {np.abs(x.samples[last] - x.mica).max():.3g}")
        best = _best(x.scores)
        shape = (x.mica if x.mica is not None else x.samples[last]) if best == last else x.samples[best]
        return shape, _rms_spread(space, x.samples)


class GaussianStrategy(FusionStrategy):
    """Product of N(sample mean, shrunk sample covariance + ofer_bias²·I) and N(MICA, σ(v)²·I).

    Covariance: Σ̂ = (1 − α)·S + α·diag(S) (shrinkage toward the diagonal), S the unbiased sample
    covariance, diagonal floored at ``min_variance``, plus ``ofer_bias``²·I: the samples show how
    much they vary, not how far their centre is from the truth, and without that term a tight sample
    cloud would be trusted over MICA however wrong it is (the controlled study shows exactly that).
    α = ``shrinkage`` when in [0, 1]; when negative (default) α is estimated from the samples
    (Schäfer & Strimmer 2005, target "D": α = Σ_{i≠j} Var(r_ij) / Σ_{i≠j} r_ij², clipped to [0, 1]).
    MICA's width σ(v) = sigma_mica·(1 + occlusion_gain·(1 − v)) in units of FLAME's unit-variance
    coefficients. Fused mean = m + Σ̂(Σ̂ + σ²I)⁻¹(MICA − m), covariance
    Σ̂σ²(Σ̂ + σ²I)⁻¹ (spread = its per-vertex standard deviation), Σ̂ including the bias term.
    """

    name = "gaussian"
    needs = ("mica_shape", "samples")
    defaults: ClassVar[dict[str, float]] = {
        "sigma_mica": 0.3,
        "occlusion_gain": 1.0,
        "ofer_bias": 0.3,
        "shrinkage": -1.0,
        "min_variance": 1e-4,
    }
    min_samples = 2
    summary = "Precision-weighted product of OFER's sample distribution and a MICA likelihood widened by occlusion."

    @staticmethod
    def shrinkage_intensity(samples: np.ndarray, min_variance: float = 1e-4) -> float:
        """Schäfer–Strimmer estimate of α for the diagonal target (O(N·K²))."""
        n = samples.shape[0]
        if n < 3:
            return 1.0
        centred = samples - samples.mean(axis=0)
        std = np.sqrt(np.maximum((centred**2).sum(axis=0) / (n - 1), min_variance))
        z = centred / std
        w_mean = (z.T @ z) / n  # mean of w_kij = z_ki z_kj
        w_sq = (z.T**2) @ (z**2)  # Σ_k w_kij²
        var_r = n / (n - 1) ** 3 * (w_sq - n * w_mean**2)
        r = n / (n - 1) * w_mean
        off = ~np.eye(samples.shape[1], dtype=bool)
        denominator = float((r[off] ** 2).sum())
        return 1.0 if denominator <= 0 else float(np.clip(var_r[off].sum() / denominator, 0.0, 1.0))

    def shrinkage(self, samples: np.ndarray, options: dict[str, float]) -> float:
        """α: the ``shrinkage`` option, or the estimate from the samples when it is negative."""
        alpha = options["shrinkage"]
        if alpha > 1.0:
            raise InvalidInputError("fusion strategy 'gaussian': shrinkage must be <= 1 "
                                    f"(negative: automatic), got {alpha}")
        return self.shrinkage_intensity(samples, options["min_variance"]) if alpha < 0 else alpha

    @staticmethod
    def variances(sample_variances: np.ndarray, options: dict[str, float]) -> np.ndarray:
        """Σ̂'s diagonal: each coefficient's sample variance floored at ``min_variance``, plus bias²."""
        return np.maximum(sample_variances, options["min_variance"]) + options["ofer_bias"] ** 2

    def covariance(self, samples: np.ndarray, options: dict[str, float], alpha: float | None = None) -> np.ndarray:
        """Σ̂ (K, K): the shrunk sample covariance plus the bias term (``alpha``: α when already known)."""
        n = samples.shape[0]
        centred = samples - samples.mean(axis=0)
        cov = centred.T @ centred / max(n - 1, 1)
        alpha = self.shrinkage(samples, options) if alpha is None else alpha
        shrunk = (1.0 - alpha) * cov
        # the diagonal keeps all of S_ii ((1-α)·S_ii + α·S_ii), floored, plus bias²
        shrunk[np.diag_indices_from(shrunk)] = self.variances(np.diag(cov), options)
        return shrunk

    def fuse(self, x, options, space):
        if (
            options["sigma_mica"] <= 0
            or options["occlusion_gain"] < 0
            or options["min_variance"] <= 0
            or options["ofer_bias"] < 0
        ):
            raise InvalidInputError(
                "fusion strategy 'gaussian': need sigma_mica > 0, occlusion_gain >= 0, ofer_bias >= 0, min_variance > 0"
            )
        sigma = options["sigma_mica"] * (1.0 + options["occlusion_gain"] * (1.0 - x.v))
        mean = x.samples.mean(axis=0)
        alpha = self.shrinkage(x.samples, options)
        eigval, eigvec = np.linalg.eigh(self.covariance(x.samples, options, alpha))
        eigval = np.maximum(eigval, 0.0)
        gain = eigval / (eigval + sigma**2)  # how far toward MICA, per principal direction
        shape = mean + eigvec @ (gain * (eigvec.T @ (x.mica - mean)))
        if len(x.samples) < space.num_coeffs:
            return shape, self.spread_low_rank(x.samples, options, alpha, sigma, space)
        post_sd = np.sqrt(eigval * sigma**2 / (eigval + sigma**2))
        disp = space.basis_mm() @ (eigvec * post_sd)  # (3V, K): columns = posterior modes in mm
        spread = np.sqrt((disp**2).reshape(space.num_vertices, 3, -1).sum(axis=(1, 2)))
        return shape, spread

    def spread_low_rank(self, samples: np.ndarray, options: dict[str, float], alpha: float, sigma: float,
                        space: ShapeSpace) -> np.ndarray:
        """The posterior's per-vertex sd in mm, the same as from its eigenvectors, for N < K samples.

        Σ̂ = D + UUᵀ with D diagonal (>= bias²) and U = √((1−α)/(N−1))·(samples − mean)ᵀ of rank N − 1,
        so by Woodbury the posterior Σ̂σ²(Σ̂ + σ²I)⁻¹ = σ²D(D + σ²I)⁻¹ + WWᵀ with W (K, N) small. A
        vertex's variance is then Σ_k |b_vk|²·diag_k + ‖b_vᵀW‖²: (3V, K) by (K, N) products instead of
        (3V, K) by (K, K), about 30 times less work at N = 10.
        """
        n = samples.shape[0]
        centred = samples - samples.mean(axis=0)
        sample_var = (centred**2).sum(axis=0) / max(n - 1, 1)
        u = centred.T * np.sqrt((1.0 - alpha) / max(n - 1, 1))  # (K, N)
        d = self.variances(sample_var, options) - (1.0 - alpha) * sample_var  # Σ̂ = D + UUᵀ
        a = d + sigma**2
        u_over_a = u / a[:, None]
        lower = np.linalg.cholesky(np.eye(n) + u.T @ u_over_a)  # (N, N), positive definite
        w = sigma**2 * scipy.linalg.solve_triangular(lower, u_over_a.T, lower=True).T  # (K, N): A⁻¹U L⁻ᵀ σ²
        modes = (space.basis_mm() @ w).reshape(space.num_vertices, 3, n)
        variance = space.basis_sq_norms_mm() @ (sigma**2 * d / a) + (modes**2).sum(axis=(1, 2))
        return np.sqrt(np.maximum(variance, 0.0))


class SdeditStrategy(FusionStrategy):
    name = "sdedit"
    needs = ("samples", "scores")
    # Informational: the t0 the ofer service used (see sdedit_t0).
    defaults: ClassVar[dict[str, float]] = {"t0": float(SDEDIT_T_MIN)}
    summary = "Rank-select among samples the ofer service drew starting from MICA's shape noised to t0."

    def steering(self, options, visibility):
        return SamplerSteering(mica_first=True, start_t0=int(options.get("t0", sdedit_t0(visibility))))

    def fuse(self, x, options, space):
        if options["t0"] == 0 and x.mica is not None:
            return x.mica, np.zeros(space.num_vertices)  # no noise: the samples are MICA's shape
        return x.samples[_best(x.scores)], _rms_spread(space, x.samples)


class GuidedStrategy(FusionStrategy):
    name = "guided"
    needs = ("samples", "scores")
    # Informational: the strength the ofer service used.
    defaults: ClassVar[dict[str, float]] = {"strength": GUIDED_MAX_STRENGTH}
    summary = "Rank-select among samples whose every step's x̂₀ was pulled toward MICA's shape."

    def steering(self, options, visibility):
        return SamplerSteering(
            mica_first=True, guide_strength=float(options.get("strength", guided_strength(visibility)))
        )

    def fuse(self, x, options, space):
        return x.samples[_best(x.scores)], _rms_spread(space, x.samples)


class RegionStrategy(FusionStrategy):
    """Per-vertex blend w_v·MICA + (1 − w_v)·pick with w = visibility (FLAME regions), projected back to β.

    β = MICA + argmin_δ ‖S·δ − (1 − w)⊙(S·(pick − MICA))‖² + λ‖δ‖² (plain least squares over all
    vertices, ridge λ = ``space.ridge_mm2``): full visibility gives MICA's shape exactly.
    ``smooth`` neighbour-averaging passes soften the region borders before the projection.
    """

    name = "region"
    needs = ("mica_shape", "samples", "scores")
    defaults: ClassVar[dict[str, float]] = {"smooth": 2.0}
    summary = "Visible regions from MICA, occluded ones from IdRank's pick; projected back to a valid shape."

    def fuse(self, x, options, space):
        if options["smooth"] < 0:
            raise InvalidInputError(f"fusion strategy 'region': smooth must be >= 0, got {options['smooth']}")
        w = space.region_weights(x.visibility, smooth_iterations=int(options["smooth"]))
        occluded = (1.0 - w)[:, None]
        pick = x.samples[_best(x.scores)]
        delta = space.fit_displacement_mm(occluded * space.displacement_mm(pick - x.mica))
        # Spread: the same linear map applied to every sample, around its mean.
        deltas = space.fit_displacement_mm(occluded[None] * space.displacement_mm(x.samples - x.mica))
        return x.mica + delta, _rms_spread(space, deltas)


_CLASSES: tuple[type[FusionStrategy], ...] = (
    MicaStrategy,
    OferStrategy,
    LinearStrategy,
    PoolStrategy,
    GaussianStrategy,
    SdeditStrategy,
    GuidedStrategy,
    RegionStrategy,
)
STRATEGIES: dict[str, FusionStrategy] = {cls.name: cls() for cls in _CLASSES}
DEFAULT_STRATEGY = "gaussian"
"""See docs/fusion.md for why (the controlled study) and what was not measured."""


def strategy_names() -> list[str]:
    return list(STRATEGIES)


def create_strategy(name: str, **overrides: float) -> FusionStrategy:
    """A strategy with its defaults overridden (timm-style: one registry, uniform constructors)."""
    if name not in STRATEGIES:
        raise InvalidInputError(f"unknown fusion strategy {name!r}; known: {strategy_names()}")
    return type(STRATEGIES[name])(**overrides)


def steering_for(name: str, options: dict[str, float], visibility: float) -> SamplerSteering:
    """How the generative branch must run for strategy ``name`` with these per-request options."""
    if name not in STRATEGIES:
        raise InvalidInputError(f"unknown fusion strategy {name!r}; known: {strategy_names()}")
    return STRATEGIES[name].steering(options, visibility)


def fuse(name: str, inputs: FusionInputs, space: ShapeSpace) -> FusionResult:
    """Run the strategy ``name`` (per-request options in ``inputs.options``)."""
    if name not in STRATEGIES:
        raise InvalidInputError(f"unknown fusion strategy {name!r}; known: {strategy_names()}")
    return STRATEGIES[name](inputs, space)
