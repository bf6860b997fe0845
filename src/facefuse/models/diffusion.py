"""OFER IdGen's variance schedule and the samplers that run its reverse diffusion.

The schedule (``VarianceSchedule``) is the module the checkpoint's ``var_sched`` section loads into:
17 buffers with the official names, dtypes and arithmetic. Samplers are separate objects (as in
diffusers), so the same network can be sampled the official way or faster:

* :class:`OfficialSampler` replays OFER's test-time procedure exactly: 251 network evaluations at
  t = 999, 995, ..., 3, -1, each using the single-step coefficients of t -> t-1, float64 updates, and
  one unused normal draw per step with t > 0 (it consumes random numbers, so it is drawn).
* :class:`DDIMSampler` is a textbook strided DDIM (Song et al. 2021) over the same 1000-step schedule.

Both take an explicit ``torch.Generator`` or explicit noise tensors, and both expose the two hooks the
fusion strategies need: start from a given shape noised to step ``t0`` (SDEdit) and pull each step's
x̂₀ toward a target shape with a per-sample strength (guidance).

Convention for ``t0``: the number of forward-diffusion steps applied to ``x0_start``, 0..1000. The
start state is x = sqrt(ᾱ[t0-1])·x0 + sqrt(1-ᾱ[t0-1])·ε, the reverse chain begins at timestep index
t0-1 and then follows the sampler's own grid below it; ``t0 = 0`` returns ``x0_start`` unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

NUM_TRAIN_STEPS = 1000
BETA_1 = 1e-4
BETA_T = 1e-2
DEFAULT_DDIM_STEPS = 40
"""facefuse's default DDIM step count: 6.3x fewer network evaluations than the official 251, and on an exact
denoiser ~10x closer to the 1000-step DDIM solution than the official loop (benchmarks/bench_idgen.py)."""

EpsModel = Callable[[Tensor, Tensor], Tensor]
"""eps_model(x float32 (B, D), t int64 (B,)) -> predicted noise float32 (B, D). An eps model may also have a
``prepare_steps(timesteps)`` method: the samplers call it once, before their loop, with every timestep they
will evaluate, so it can compute what depends on the step alone in one batch (``idgen.SharedFilmEps``)."""


def _linear_schedule(
    num_steps: int, beta_1: float, beta_T: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """betas, alphas, ᾱ (all float32, numpy arithmetic as upstream) and ᾱ_prev (float64, ᾱ_prev[0] = 1)."""
    betas = torch.linspace(beta_1, beta_T, steps=num_steps).numpy().astype(np.float32)
    alphas = 1 - betas
    alphas_cumprod = np.cumprod(alphas)  # sequential float32 product
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])  # float64
    return betas, alphas, alphas_cumprod, alphas_cumprod_prev


class VarianceSchedule(nn.Module):
    """Linear β schedule with the 17 buffers of OFER's ``VarianceScheduleMLP`` (float32 / float64 as upstream).

    Samplers do not read these buffers: like the official code they rebuild their tables from the
    Python attributes (``num_steps``, ``beta_1``, ``beta_T``) with :class:`SamplingTables`.
    """

    def __init__(self, num_steps: int = NUM_TRAIN_STEPS, beta_1: float = BETA_1, beta_T: float = BETA_T) -> None:
        super().__init__()
        self.mode = "linear"
        self.num_steps = num_steps
        self.beta_1 = beta_1
        self.beta_T = beta_T
        betas, alphas, abar, abar_prev = _linear_schedule(num_steps, beta_1, beta_T)
        one_minus_abar = 1.0 - abar
        posterior_variance = betas * (1.0 - abar_prev) / one_minus_abar  # float64
        buffers: dict[str, Tensor] = {
            "betas": torch.from_numpy(betas),
            "alphas": torch.from_numpy(alphas),
            "alphas_cumprod": torch.from_numpy(abar),
            "alphas_cumprod_prev": torch.from_numpy(abar_prev),
            "sqrt_alpha_cumprod": torch.from_numpy(np.sqrt(abar)),
            "sqrt_alpha": torch.from_numpy(np.sqrt(alphas)),
            "sqrt_recip_alpha": torch.from_numpy(np.sqrt(1.0 / alphas)),
            "sqrt_one_minus_alpha_cumprod": torch.from_numpy(np.sqrt(one_minus_abar)),
            "log_one_minus_alpha_cumprod": torch.from_numpy(np.log(one_minus_abar)),
            "sqrt_recip_alpha_cumprod": torch.from_numpy(np.sqrt(1.0 / abar)),
            "sqrt_recip_minus_one_alpha_cumprod": torch.from_numpy(np.sqrt(1.0 / abar - 1)),
            "posterior_variance": torch.from_numpy(posterior_variance),
            "posterior_log_variance_clipped": torch.from_numpy(np.log(np.maximum(posterior_variance, 1e-20))),
            "posterior_mean_coeff1": torch.from_numpy(betas * np.sqrt(abar_prev) / one_minus_abar),
            "posterior_mean_coeff2": torch.from_numpy((1.0 - abar_prev) * np.sqrt(alphas) / one_minus_abar),
            "posterior_mean_coeff3": torch.from_numpy(betas * np.sqrt(1.0 / one_minus_abar)),
            "mean_coeff": torch.from_numpy(one_minus_abar) / torch.from_numpy(betas),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.contiguous().clone())


@dataclass(frozen=True)
class SamplingTables:
    """The test-time tables the official sampler rebuilds from the schedule's attributes (η = 0)."""

    alphas_cumprod: Tensor  # float32 (T,)
    alphas_cumprod_prev: Tensor  # float64 (T,), [1, ᾱ_0 .. ᾱ_{T-2}]
    sqrt_recip_alphas_cumprod: Tensor  # float32 (T,), sqrt(1/ᾱ)
    sqrt_recip_minus_one_alphas_cumprod: Tensor  # float32 (T,), sqrt(1/ᾱ - 1)

    @classmethod
    def linear(cls, num_steps: int = NUM_TRAIN_STEPS, beta_1: float = BETA_1, beta_T: float = BETA_T) -> SamplingTables:
        _, _, abar, abar_prev = _linear_schedule(num_steps, beta_1, beta_T)
        return cls(
            torch.from_numpy(abar),
            torch.from_numpy(abar_prev),
            torch.from_numpy(np.sqrt(1.0 / abar)),
            torch.from_numpy(np.sqrt(1.0 / abar - 1)),
        )

    @classmethod
    def of(cls, schedule: VarianceSchedule) -> SamplingTables:
        if schedule.mode != "linear":
            raise ValueError(f"only the linear schedule is implemented, got {schedule.mode!r}")
        return cls.linear(schedule.num_steps, schedule.beta_1, schedule.beta_T)

    @property
    def num_steps(self) -> int:
        return int(self.alphas_cumprod.shape[0])


@dataclass(frozen=True)
class StepState:
    """What a sampler saw at one network evaluation (handed to ``callback``).

    ``callback`` runs after every evaluation and changes nothing; an exception it raises propagates out
    of ``sample`` and ends the loop there, which is how a service stops work whose caller went away."""

    index: int  # 0-based evaluation counter
    t: int  # timestep index given to the network (may be -1 for the official last step)
    x: Tensor  # the state fed to the network (float32)
    eps: Tensor  # noise estimate after guidance
    x0: Tensor  # x̂₀ after guidance


@dataclass(frozen=True)
class Guidance:
    """Pull of x̂₀ toward ``target`` with ``strength`` in [0, 1] (scalar or per sample (B,))."""

    target: Tensor  # (1 or B, D)
    strength: float | Tensor

    def apply(self, x0: Tensor) -> Tensor:
        strength = self.strength
        if isinstance(strength, Tensor):
            strength = strength.to(x0.dtype).reshape(-1, 1) if strength.dim() > 0 else strength.to(x0.dtype)
        # lerp returns exactly ``target`` for strength 1 and exactly x0 for strength 0.
        return torch.lerp(x0, self.target.to(x0.dtype).expand_as(x0), strength)


def _check_strength(strength: float | Tensor, batch: int) -> None:
    values = strength if isinstance(strength, Tensor) else torch.tensor(float(strength))
    if values.dim() > 1 or (values.dim() == 1 and values.shape[0] not in (1, batch)):
        raise ValueError(f"guide_strength: expected a scalar or shape ({batch},), got {tuple(values.shape)}")
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()) or bool((values > 1).any()):
        raise ValueError("guide_strength: values must lie in [0, 1]")


def gaussian_data_eps(tables: SamplingTables, std: Tensor, mean: Tensor | None = None) -> EpsModel:
    """The exact ε-model for data β ~ N(mean, diag(std²)): ε̂ = √(1−ᾱ)·(x − √ᾱ·mean) / (ᾱ·std² + 1 − ᾱ).

    No network: with it a sampler's error is its own discretisation error, which is how step counts are
    judged (``benchmarks/bench_idgen.py``, ``benchmarks/study_sampler_quality.py``). ``mean`` may be
    (D,) or per sample (B, D); t = -1 wraps to the last step, as the official loop indexes.
    """
    abar = tables.alphas_cumprod.double()
    std = std.double()
    centre = torch.zeros_like(std) if mean is None else mean.double()

    def eps(x: Tensor, t: Tensor) -> Tensor:
        a = abar[t].unsqueeze(1)
        return ((1 - a).sqrt() * (x.double() - a.sqrt() * centre) / (a * std**2 + 1 - a)).float()

    return eps


class _Sampler:
    """Shared plumbing: noise sources, the SDEdit start and the guidance hook."""

    def _normal(self, shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
        if generator is None:
            raise ValueError("sampler: pass a torch.Generator or explicit noise tensors (no hidden global RNG)")
        return torch.normal(0.0, 1.0, size=shape, generator=generator)

    def _initial(self, batch: int, dim: int, generator: torch.Generator | None, noise: Tensor | None) -> Tensor:
        if noise is not None:
            if tuple(noise.shape) != (batch, dim):
                raise ValueError(f"initial noise: shape {tuple(noise.shape)}, expected {(batch, dim)}")
            return noise
        if generator is None:
            raise ValueError("sampler: pass a torch.Generator or initial_noise (no hidden global RNG)")
        return torch.randn(batch, dim, generator=generator)

    @staticmethod
    def _announce(eps_model: EpsModel, steps: Sequence[int]) -> None:
        prepare = getattr(eps_model, "prepare_steps", None)
        if callable(prepare):
            prepare(steps)

    def _prepare(
        self,
        tables: SamplingTables,
        batch: int,
        dim: int,
        grid: Sequence[int],
        generator: torch.Generator | None,
        initial_noise: Tensor | None,
        x0_start: Tensor | None,
        t0: int | None,
    ) -> tuple[Tensor, list[int], bool]:
        """(start x, timesteps to evaluate, finished): with t0 == 0, x is already the result (x0_start)."""
        if x0_start is None:
            if t0 is not None:
                raise ValueError("t0 given without x0_start")
            return self._initial(batch, dim, generator, initial_noise), list(grid), False
        if x0_start.dim() != 2 or x0_start.shape[1] != dim or x0_start.shape[0] not in (1, batch):
            raise ValueError(f"x0_start: shape {tuple(x0_start.shape)}, expected (1 or {batch}, {dim})")
        if t0 is None or not 0 <= int(t0) <= tables.num_steps:
            raise ValueError(f"t0: expected an integer in [0, {tables.num_steps}] with x0_start, got {t0!r}")
        t0 = int(t0)
        x0 = x0_start.expand(batch, dim)
        if t0 == 0:
            return x0.to(torch.float64).clone(), [], True
        eps = self._initial(batch, dim, generator, initial_noise)
        abar = tables.alphas_cumprod[t0 - 1].to(torch.float64)
        x = abar.sqrt() * x0.to(torch.float64) + (1.0 - abar).sqrt() * eps.to(torch.float64)
        start = t0 - 1
        return x, [start, *(t for t in grid if t < start)], False

    @staticmethod
    def _guidance(
        batch: int, guide_target: Tensor | None, guide_strength: float | Tensor | None, dim: int
    ) -> Guidance | None:
        if guide_target is None:
            return None
        if guide_target.dim() != 2 or guide_target.shape[1] != dim or guide_target.shape[0] not in (1, batch):
            raise ValueError(f"guide_target: shape {tuple(guide_target.shape)}, expected (1 or {batch}, {dim})")
        strength = 1.0 if guide_strength is None else guide_strength
        _check_strength(strength, batch)
        return Guidance(guide_target, strength)


class OfficialSampler(_Sampler):
    """OFER's test-time 'ddim' loop, reproduced step for step (251 evaluations for 1000 steps).

    Random numbers are taken from ``generator`` in the order the official code takes them from the
    global RNG: x_T = randn(B, D) first, then one normal(B, D) per step with t > 0 (unused, σ = 0).
    Seeding ``generator`` like the official global RNG therefore reproduces its samples and leaves the
    generator in the same state. With explicit ``initial_noise`` and no generator the unused draws are
    skipped (the samples are the same). For SDEdit the start noise ε takes x_T's place in that order.
    """

    stride = 4

    def timesteps(self, num_steps: int = NUM_TRAIN_STEPS) -> list[int]:
        return list(reversed(range(-1, num_steps, self.stride)))

    def sample(
        self,
        eps_model: EpsModel,
        tables: SamplingTables,
        batch_size: int,
        *,
        dim: int = 300,
        generator: torch.Generator | None = None,
        initial_noise: Tensor | None = None,
        x0_start: Tensor | None = None,
        t0: int | None = None,
        guide_target: Tensor | None = None,
        guide_strength: float | Tensor | None = None,
        callback: Callable[[StepState], None] | None = None,
    ) -> Tensor:
        """Samples as float64 (B, D), like the official code."""
        x, steps, finished = self._prepare(tables, batch_size, dim, self.timesteps(tables.num_steps), generator,
                                           initial_noise, x0_start, t0)
        if finished:
            return x
        self._announce(eps_model, steps)
        guidance = self._guidance(batch_size, guide_target, guide_strength, dim)
        for index, t in enumerate(steps):
            if t > 0 and generator is not None:
                # Drawn and multiplied by σ = 0 upstream: consumed so the generator ends where the official RNG does.
                self._normal((batch_size, dim), generator)
            x32 = x.to(torch.float32)
            eps = eps_model(x32, torch.full((batch_size,), t, dtype=torch.long))
            a = tables.sqrt_recip_alphas_cumprod[t]  # t = -1 wraps to T-1, as Python indexing does upstream
            b = tables.sqrt_recip_minus_one_alphas_cumprod[t]
            x0 = a * x32 - b * eps
            if guidance is not None:
                # ε consistent with the moved x̂₀ (x̂₀ = a·x − b·ε); a zero pull leaves ε bit-identical.
                pulled = guidance.apply(x0)
                eps = eps - (pulled - x0) / b
                x0 = pulled
            if callback is not None:
                callback(StepState(index, t, x32, eps, x0))
            abar_prev = tables.alphas_cumprod_prev[t]  # float64; ᾱ_{t-1}, and ᾱ_{T-2} for t = -1
            x = torch.sqrt(abar_prev) * x0.to(torch.float64) + torch.sqrt(1 - abar_prev) * eps.to(torch.float64)
        return x


class DDIMSampler(_Sampler):
    """Strided DDIM over the 1000-step schedule (eta = 0: deterministic given x_T).

    Grid ("trailing" spacing): τ_k = (T·k)//S − 1 for k = S..1, e.g. 999, 979, ..., 19 for S = 50 and
    999..0 for S = T. Each step maps τ to the next grid point s (ᾱ_s = 1 after the last), with
    x̂₀ = (x − √(1−ᾱ_τ)·ε̂)/√ᾱ_τ, σ = η·√((1−ᾱ_s)/(1−ᾱ_τ))·√(1−ᾱ_τ/ᾱ_s) and
    x_s = √ᾱ_s·x̂₀ + √(1−ᾱ_s−σ²)·ε̂ + σ·z, all in float64 (the network sees float32).
    With η > 0, z comes from ``step_noise[k]`` (shape (S, B, D)) or from ``generator`` after x_T.
    """

    def __init__(self, num_steps: int = DEFAULT_DDIM_STEPS, eta: float = 0.0) -> None:
        if num_steps < 1:
            raise ValueError(f"DDIMSampler: num_steps must be >= 1, got {num_steps}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"DDIMSampler: eta must lie in [0, 1], got {eta}")
        self.num_steps = num_steps
        self.eta = eta

    def timesteps(self, num_train_steps: int = NUM_TRAIN_STEPS) -> list[int]:
        steps = min(self.num_steps, num_train_steps)
        return [(num_train_steps * k) // steps - 1 for k in range(steps, 0, -1)]

    def sample(
        self,
        eps_model: EpsModel,
        tables: SamplingTables,
        batch_size: int,
        *,
        dim: int = 300,
        generator: torch.Generator | None = None,
        initial_noise: Tensor | None = None,
        step_noise: Tensor | None = None,
        x0_start: Tensor | None = None,
        t0: int | None = None,
        guide_target: Tensor | None = None,
        guide_strength: float | Tensor | None = None,
        callback: Callable[[StepState], None] | None = None,
    ) -> Tensor:
        """Samples as float64 (B, D)."""
        x, steps, finished = self._prepare(tables, batch_size, dim, self.timesteps(tables.num_steps), generator,
                                           initial_noise, x0_start, t0)
        if finished:
            return x
        self._announce(eps_model, steps)
        guidance = self._guidance(batch_size, guide_target, guide_strength, dim)
        if step_noise is not None and tuple(step_noise.shape[1:]) != (batch_size, dim):
            raise ValueError(f"step_noise: shape {tuple(step_noise.shape)}, expected (steps, {batch_size}, {dim})")
        abar_table = tables.alphas_cumprod.to(torch.float64)
        x = x.to(torch.float64)
        for index, t in enumerate(steps):
            s = steps[index + 1] if index + 1 < len(steps) else -1
            abar_t = abar_table[t]
            abar_s = abar_table[s] if s >= 0 else torch.tensor(1.0, dtype=torch.float64)
            x32 = x.to(torch.float32)
            eps = eps_model(x32, torch.full((batch_size,), t, dtype=torch.long)).to(torch.float64)
            x0 = (x - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
            if guidance is not None:
                # ε consistent with the moved x̂₀ (x = √ᾱ·x̂₀ + √(1−ᾱ)·ε); a zero pull leaves ε bit-identical.
                pulled = guidance.apply(x0)
                eps = eps - (pulled - x0) * (abar_t / (1 - abar_t)).sqrt()
                x0 = pulled
            if callback is not None:
                callback(StepState(index, t, x32, eps, x0))
            sigma = self.eta * ((1 - abar_s) / (1 - abar_t)).sqrt() * (1 - abar_t / abar_s).sqrt()
            x = abar_s.sqrt() * x0 + (1 - abar_s - sigma**2).clamp_min(0).sqrt() * eps
            if self.eta > 0 and s >= 0:
                if step_noise is not None:
                    if index >= step_noise.shape[0]:
                        raise ValueError(f"step_noise: {step_noise.shape[0]} steps given, at least {index + 1} needed")
                    z = step_noise[index]
                else:
                    z = self._normal((batch_size, dim), generator)
                x = x + sigma * z.to(torch.float64)
        return x

