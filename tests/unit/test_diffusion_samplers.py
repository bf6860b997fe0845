"""Variance schedule and samplers against independent implementations written here from the documented
procedures (architecture reference §5.4, §5.5) and the published DDIM update (Song et al. 2021, eq. 12)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facefuse.assets.synthetic.ofer_idgen import STRAY_QKV_SUFFIX, idgen_net_state
from facefuse.models.diffusion import DDIMSampler, OfficialSampler, SamplingTables, StepState, VarianceSchedule
from facefuse.models.idgen import IdGen, IdGenUnet, draw_default_projections

D = 300


# --- independent schedule ---------------------------------------------------------------------------
def reference_tables():
    betas = torch.linspace(1e-4, 1e-2, 1000).numpy()  # float32, as torch.linspace makes it upstream
    abar = np.cumprod((1.0 - betas).astype(np.float32), dtype=np.float32)
    abar_prev = np.concatenate([[1.0], abar[:-1].astype(np.float64)])
    return betas, abar, abar_prev


def test_schedule_buffers(official_keys) -> None:
    schedule = VarianceSchedule()
    state = schedule.state_dict()
    official = {k: (s, d) for k, s, d in official_keys("idgen_var_sched")}
    assert {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()} == official
    betas, abar, abar_prev = reference_tables()
    # float32 buffers: the documented formulas in float32 arithmetic (as upstream computes them);
    # float64 buffers: float64 formulas of the float32 β, ᾱ (1 − ᾱ itself rounded to float32 upstream).
    one = np.float32(1.0)
    f32 = {
        "betas": betas,
        "alphas": one - betas,
        "alphas_cumprod": abar,
        "sqrt_alpha_cumprod": np.sqrt(abar),
        "sqrt_alpha": np.sqrt(one - betas),
        "sqrt_recip_alpha": np.sqrt(one / (one - betas)),
        "sqrt_one_minus_alpha_cumprod": np.sqrt(one - abar),
        "log_one_minus_alpha_cumprod": np.log(one - abar),
        "sqrt_recip_alpha_cumprod": np.sqrt(one / abar),
        "sqrt_recip_minus_one_alpha_cumprod": np.sqrt(one / abar - one),
        "posterior_mean_coeff3": betas / np.sqrt(one - abar),
        "mean_coeff": (one - abar) / betas,
    }
    b64, om64 = betas.astype(np.float64), (one - abar).astype(np.float64)
    f64 = {
        "alphas_cumprod_prev": abar_prev,
        "posterior_variance": b64 * (1 - abar_prev) / om64,
        "posterior_log_variance_clipped": np.log(np.maximum(b64 * (1 - abar_prev) / om64, 1e-20)),
        "posterior_mean_coeff1": b64 * np.sqrt(abar_prev) / om64,
        "posterior_mean_coeff2": (1 - abar_prev) * np.sqrt(one - betas).astype(np.float64) / om64,  # √α in float32
    }
    assert set(f32) | set(f64) == set(state)
    for key, value in f32.items():
        assert value.dtype == np.float32 and state[key].dtype == torch.float32, key
        np.testing.assert_allclose(state[key].numpy(), value, rtol=1e-6, atol=0, err_msg=key)
    for key, value in f64.items():
        assert state[key].dtype == torch.float64, key
        np.testing.assert_allclose(state[key].numpy(), value, rtol=1e-12, atol=0, err_msg=key)
    assert abs(float(state["alphas_cumprod"][0]) - 0.9999) < 1e-7
    assert abs(float(state["alphas_cumprod"][999]) - 0.0063017) < 1e-6
    assert state["alphas_cumprod_prev"][0] == 1.0 and state["alphas_cumprod_prev"][999] == float(abar[998])
    # sampler tables (rebuilt from the attributes, like upstream's test schedule)
    tables = SamplingTables.of(schedule)
    assert torch.equal(tables.alphas_cumprod, state["alphas_cumprod"])
    assert tables.alphas_cumprod_prev.dtype == torch.float64


# --- stand-in eps networks --------------------------------------------------------------------------
class TinyEps:
    """A cheap deterministic, row-independent eps model (for 1000-step and 251-step runs)."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(D, D, generator=g) / D**0.5
        self.freq = torch.randn(D, generator=g)
        self.calls: list[int] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.float32 and t.dtype == torch.long
        self.calls.append(int(t[0]))
        return torch.tanh(x @ self.w + torch.sin(t[:, None].float() * 1e-3 * self.freq)) * 0.9 + 0.1 * x


@pytest.fixture(scope="module")
def unet_eps():
    state = {
        k: v for k, v in idgen_net_state(torch.Generator().manual_seed(4)).items() if not k.endswith(STRAY_QKV_SUFFIX)
    }
    with torch.device("meta"):
        net = IdGenUnet()
    net = net.to_empty(device="cpu")
    net.load_state_dict(state, strict=True)
    net.set_projections(draw_default_projections(torch.Generator().manual_seed(0)))
    net.eval()
    context = F.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(9)), dim=1)

    def make(batch: int):
        ctx = context.expand(batch, 512)

        @torch.no_grad()
        def eps(x, t):
            return net(x, t, ctx)

        return eps

    return make


# --- independent official procedure -----------------------------------------------------------------
def reference_official(eps_model, batch: int, generator: torch.Generator, timesteps: list[int]):
    _, abar, abar_prev = reference_tables()
    a_tab = np.sqrt(1.0 / abar)  # float32
    b_tab = np.sqrt(1.0 / abar - 1)  # float32
    x = torch.randn(batch, D, generator=generator)
    for t in timesteps:
        if t > 0:
            torch.normal(0, 1, size=(batch, D), generator=generator)
        x32 = x.float()
        eps = eps_model(x32, torch.tensor([t] * batch, dtype=torch.long))
        a = torch.from_numpy(a_tab[[t] * batch]).view(-1, 1)
        b = torch.from_numpy(b_tab[[t] * batch]).view(-1, 1)
        x0 = a * x32 - b * eps
        c1 = torch.sqrt(torch.from_numpy(abar_prev[[t] * batch])).view(-1, 1)
        c2 = torch.sqrt(1 - torch.from_numpy(abar_prev[[t] * batch]) - 0.0).view(-1, 1)
        x = c1 * x0 + c2 * eps  # dimensioned float64 coefficients promote to float64
    return x


def test_official_timesteps() -> None:
    steps = OfficialSampler().timesteps()
    assert len(steps) == 251 and steps[:3] == [999, 995, 991] and steps[-2:] == [3, -1]


def test_official_full_251_steps_bit_exact_and_rng_state() -> None:
    ours_g, ref_g = torch.Generator().manual_seed(21), torch.Generator().manual_seed(21)
    eps = TinyEps()
    ours = OfficialSampler().sample(eps, SamplingTables.linear(), 3, generator=ours_g)
    expected = reference_official(TinyEps(), 3, ref_g, list(range(999, -2, -4)))
    assert ours.dtype == torch.float64 and ours.shape == (3, D)
    assert torch.equal(ours, expected)
    assert torch.equal(ours_g.get_state(), ref_g.get_state())  # 1 + 250 draws, same order
    assert len(eps.calls) == 251 and eps.calls[-1] == -1


class ShortOfficial(OfficialSampler):
    def timesteps(self, num_steps: int = 1000) -> list[int]:
        return [999, 995, 3, -1]


def test_official_one_step_and_short_run_with_real_unet(unet_eps) -> None:
    eps = unet_eps(2)
    one = type("OneStep", (OfficialSampler,), {"timesteps": lambda self, n=1000: [999]})()
    ours = one.sample(eps, SamplingTables.linear(), 2, generator=torch.Generator().manual_seed(3))
    expected = reference_official(eps, 2, torch.Generator().manual_seed(3), [999])
    assert torch.equal(ours, expected)
    ours = ShortOfficial().sample(eps, SamplingTables.linear(), 2, generator=torch.Generator().manual_seed(4))
    expected = reference_official(eps, 2, torch.Generator().manual_seed(4), [999, 995, 3, -1])
    assert torch.equal(ours, expected)
    assert torch.isfinite(ours).all()


# --- independent textbook DDIM ----------------------------------------------------------------------
def reference_ddim(eps_model, x_T: torch.Tensor, num_steps: int, eta: float = 0.0, noises=None) -> np.ndarray:
    _, abar, _ = reference_tables()
    abar = abar.astype(np.float64)
    taus = (np.round(np.arange(1000, 0, -1000 / num_steps)) - 1).astype(int)  # "trailing" spacing
    x = x_T.double().numpy()
    for i, t in enumerate(taus):
        a_t = abar[t]
        a_s = abar[taus[i + 1]] if i + 1 < len(taus) else 1.0
        e = eps_model(torch.from_numpy(x).float(), torch.full((x.shape[0],), int(t), dtype=torch.long)).double().numpy()
        x0 = (x - np.sqrt(1 - a_t) * e) / np.sqrt(a_t)
        sigma = eta * np.sqrt((1 - a_s) / (1 - a_t)) * np.sqrt(1 - a_t / a_s)
        x = np.sqrt(a_s) * x0 + np.sqrt(max(1 - a_s - sigma**2, 0.0)) * e
        if eta > 0 and i + 1 < len(taus):
            x = x + sigma * noises[i].double().numpy()
    return x


def test_ddim_1000_steps_matches_textbook() -> None:
    x_T = torch.randn(3, D, generator=torch.Generator().manual_seed(1))
    ours = DDIMSampler(1000).sample(TinyEps(), SamplingTables.linear(), 3, initial_noise=x_T)
    expected = reference_ddim(TinyEps(), x_T, 1000)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-9, atol=1e-9)


def test_ddim_50_steps_matches_textbook_with_real_unet(unet_eps) -> None:
    x_T = torch.randn(2, D, generator=torch.Generator().manual_seed(2))
    sampler = DDIMSampler(50)
    assert sampler.timesteps()[:2] == [999, 979] and sampler.timesteps()[-1] == 19
    ours = sampler.sample(unet_eps(2), SamplingTables.linear(), 2, initial_noise=x_T)
    expected = reference_ddim(unet_eps(2), x_T, 50)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-5 * scale)


def test_ddim_eta_with_explicit_noise_matches_textbook() -> None:
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(2, D, generator=g)
    noises = torch.randn(20, 2, D, generator=g)
    ours = DDIMSampler(20, eta=0.7).sample(TinyEps(), SamplingTables.linear(), 2, initial_noise=x_T, step_noise=noises)
    expected = reference_ddim(TinyEps(), x_T, 20, eta=0.7, noises=noises)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sampler", [DDIMSampler(25), DDIMSampler(10, eta=1.0), ShortOfficial()])
def test_same_seed_same_samples_different_seed_different(sampler) -> None:
    def run(seed: int) -> torch.Tensor:
        return sampler.sample(TinyEps(), SamplingTables.linear(), 2, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(7), run(7))
    assert not torch.allclose(run(7), run(8))


def test_batch_one_equals_row_of_batch(unet_eps) -> None:
    x_T = torch.randn(3, D, generator=torch.Generator().manual_seed(6))
    sampler = DDIMSampler(8)
    batch = sampler.sample(unet_eps(3), SamplingTables.linear(), 3, initial_noise=x_T)
    single = sampler.sample(unet_eps(1), SamplingTables.linear(), 1, initial_noise=x_T[1:2])
    assert single.shape == (1, D)
    torch.testing.assert_close(single[0], batch[1], rtol=1e-4, atol=1e-4 * float(batch.abs().max()))


def test_requires_explicit_randomness() -> None:
    with pytest.raises(ValueError, match="Generator"):
        DDIMSampler(5).sample(TinyEps(), SamplingTables.linear(), 2)


# --- fusion hooks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", [DDIMSampler(10), OfficialSampler()])
def test_sdedit_t0_zero_returns_start_exactly(sampler) -> None:
    x0 = torch.randn(1, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps = TinyEps()
    out = sampler.sample(eps, SamplingTables.linear(), 3, generator=torch.Generator().manual_seed(0), x0_start=x0, t0=0)
    assert torch.equal(out, x0.expand(3, D))
    assert eps.calls == []


@pytest.mark.parametrize("sampler", [DDIMSampler(50), OfficialSampler()])
def test_sdedit_starts_from_noised_shape(sampler) -> None:
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, D, generator=g)
    noise = torch.randn(2, D, generator=g)
    seen: list[StepState] = []
    sampler.sample(
        TinyEps(),
        SamplingTables.linear(),
        2,
        initial_noise=noise,
        generator=torch.Generator().manual_seed(0),
        x0_start=x0,
        t0=300,
        callback=seen.append,
    )
    _, abar, _ = reference_tables()
    expected = np.sqrt(float(abar[299])) * x0.double().numpy() + np.sqrt(1 - float(abar[299])) * noise.double().numpy()
    assert seen[0].t == 299
    np.testing.assert_allclose(seen[0].x.double().numpy(), expected, rtol=0, atol=1e-6)
    assert all(s.t < 299 for s in seen[1:]) and seen[-1].t in (19, -1, 0, 3)


@pytest.mark.parametrize("sampler", [DDIMSampler(10), ShortOfficial()])
def test_guidance_strength_one_sets_x0_to_target(sampler) -> None:
    target = torch.randn(1, D, generator=torch.Generator().manual_seed(3))
    seen: list[StepState] = []
    out = sampler.sample(TinyEps(), SamplingTables.linear(), 2, generator=torch.Generator().manual_seed(0),
                         guide_target=target, guide_strength=1.0, callback=seen.append)
    for state in seen:
        assert torch.equal(state.x0, target.to(state.x0.dtype).expand(2, D))
    if isinstance(sampler, DDIMSampler):  # last DDIM step returns x̂₀ (ᾱ = 1)
        assert torch.equal(out, target.double().expand(2, D))


def test_guidance_per_sample_strength() -> None:
    """Strength (B,): 0 leaves a row untouched, intermediate values pull x̂₀ by s·(target − x̂₀); ε stays consistent."""
    x_T = torch.randn(3, D, generator=torch.Generator().manual_seed(4))
    target = torch.zeros(1, D)
    free_states: list[StepState] = []
    free = DDIMSampler(10).sample(TinyEps(), SamplingTables.linear(), 3, initial_noise=x_T, callback=free_states.append)
    pulled_states: list[StepState] = []
    pulled = DDIMSampler(10).sample(TinyEps(), SamplingTables.linear(), 3, initial_noise=x_T, guide_target=target,
                                    guide_strength=torch.tensor([0.0, 0.5, 1.0]), callback=pulled_states.append)
    torch.testing.assert_close(pulled[0], free[0], rtol=0, atol=0)
    assert float(pulled[1].abs().mean()) < float(free[1].abs().mean())
    assert torch.equal(pulled[2], torch.zeros(D, dtype=torch.float64))
    _, abar, _ = reference_tables()
    first_free, first = free_states[0], pulled_states[0]
    torch.testing.assert_close(first.x0[1], 0.5 * first_free.x0[1])  # x̂₀ + 0.5·(0 − x̂₀)
    a = float(abar[first.t])
    torch.testing.assert_close(first.x.double()[1], np.sqrt(a) * first.x0[1] + np.sqrt(1 - a) * first.eps[1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        DDIMSampler(5).sample(
            TinyEps(), SamplingTables.linear(), 3, initial_noise=x_T, guide_target=target, guide_strength=1.5
        )


# --- IdGen wrapper ----------------------------------------------------------------------------------
class FakeArcface(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, blob, *, apply_features: bool):
        self.seen.append(apply_features)
        return blob.flatten(1)[:, :512] * 3.0


def test_idgen_wrapper_context_and_sample(unet_eps) -> None:
    net = IdGenUnet()
    net.set_projections(draw_default_projections(torch.Generator().manual_seed(0)))
    model = IdGen(FakeArcface(), net.eval(), VarianceSchedule())
    blob = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    context = model.context(blob)
    assert model.arcface.seen == [True]
    torch.testing.assert_close(context.norm(dim=1), torch.ones(2))
    samples = model.sample(context[:1], 4, DDIMSampler(5), torch.Generator().manual_seed(1))
    assert samples.shape == (4, D) and samples.dtype == torch.float64 and torch.isfinite(samples).all()
    again = model.sample(context[:1].expand(4, 512), 4, DDIMSampler(5), torch.Generator().manual_seed(1))
    assert torch.equal(samples, again)
    with pytest.raises(ValueError, match="context"):
        model.sample(context, 3, DDIMSampler(5), torch.Generator())


class StopAfter(Exception):
    pass


@pytest.mark.parametrize("sampler", [OfficialSampler(), DDIMSampler(20)], ids=["official", "ddim"])
def test_a_raising_callback_stops_the_loop_and_a_quiet_one_changes_nothing(sampler) -> None:
    """The services stop abandoned work through the step callback: it must end the loop at once, and
    a callback that does not raise must leave the samples bit-identical."""
    x_T = torch.randn(2, D, generator=torch.Generator().manual_seed(9))
    plain = sampler.sample(TinyEps(), SamplingTables.linear(), 2, initial_noise=x_T)
    watched = sampler.sample(TinyEps(), SamplingTables.linear(), 2, initial_noise=x_T, callback=lambda state: None)
    assert torch.equal(plain, watched)

    eps = TinyEps()

    def stop_at_third(state: StepState) -> None:
        if state.index == 2:
            raise StopAfter

    with pytest.raises(StopAfter):
        sampler.sample(eps, SamplingTables.linear(), 2, initial_noise=x_T, callback=stop_at_third)
    assert len(eps.calls) == 3, "no network evaluation after the callback raised"
