"""Flow-matching samplers: schedule vs diffusers, Euler/CFG/SDE/few-step against closed forms."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor

from model.sampling import (
    SamplerConfig,
    cfg_combine,
    config_sigmas,
    euler_step,
    flow_grpo_sampler,
    flow_sigmas,
    qwen_image_sampler,
    sample_euler,
    sample_few_step,
    sample_sde,
    sde_step,
    shift_mu,
)

# Data N(M, S^2 I) per element, noise N(0, I): the marginal of x_t is
# N((1 - t) M, (1 - t)^2 S^2 + t^2), and the exact ODE maps noise z to M + S z.
M, S = 1.0, 0.5


def gaussian_velocity(x: Tensor, t: Tensor) -> Tensor:
    """The optimal velocity E[noise - x_0 | x_t] for Gaussian data: a closed form."""
    tb = t.view(-1, *([1] * (x.ndim - 1)))
    var = (1 - tb) ** 2 * S**2 + tb**2
    return -M + (tb - (1 - tb) * S**2) / var * (x - (1 - tb) * M)


def point_velocity(target: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """Velocity of the straight flow to a per-sample point ``target``: (x - target) / t."""

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        return (x - target) / t.view(-1, *([1] * (x.ndim - 1)))

    return velocity


def _qwen_scheduler(**overrides: object) -> FlowMatchEulerDiscreteScheduler:
    config: dict[str, object] = {
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 0.9,
        "base_image_seq_len": 256,
        "max_image_seq_len": 8192,
        "shift_terminal": 0.02,
    }
    config.update(overrides)
    return FlowMatchEulerDiscreteScheduler(**config)


# ----------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("steps", [2, 4, 10, 50])
@pytest.mark.parametrize("seq_len", [256, 1024, 8192])
def test_dynamic_sigmas_match_diffusers(steps: int, seq_len: int) -> None:
    mu = shift_mu(seq_len)
    scheduler = _qwen_scheduler()
    # What the QwenImage pipelines pass: sigmas = linspace(1, 1/N, N) and mu.
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = flow_sigmas(steps, mu=mu, shift_terminal=0.02)
    assert ours.shape == (steps + 1,)
    torch.testing.assert_close(ours, scheduler.sigmas, atol=1e-6, rtol=0)
    # The config path computes the same mu from the token count.
    torch.testing.assert_close(config_sigmas(SamplerConfig(steps=steps), seq_len), ours)


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_static_sigmas_match_diffusers(shift: float, steps: int) -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
    ours = flow_sigmas(steps, shift=shift)
    torch.testing.assert_close(ours, scheduler.sigmas, atol=1e-6, rtol=0)
    config = SamplerConfig(steps=steps, dynamic_shift=False, shift=shift, shift_terminal=None)
    torch.testing.assert_close(config_sigmas(config), ours)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"shift": 3.0}, {"mu": shift_mu(4096)}, {"mu": 0.7, "shift_terminal": 0.02}],
)
def test_sigmas_endpoints_and_monotone(kwargs: dict[str, float]) -> None:
    sigmas = flow_sigmas(20, **kwargs)
    assert sigmas[0].item() == 1.0
    assert sigmas[-1].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    if "shift_terminal" in kwargs:
        assert sigmas[-2].item() == pytest.approx(0.02, abs=1e-6)
    # Dynamic shift mu is the static shift exp(mu).
    if "mu" in kwargs and "shift_terminal" not in kwargs:
        torch.testing.assert_close(sigmas, flow_sigmas(20, shift=math.exp(kwargs["mu"])))


def test_shift_mu_interpolates_the_anchors() -> None:
    # The pipelines' calculate_shift: mu = m * seq_len + b through (256, 0.5) and (8192, 0.9).
    assert shift_mu(256) == pytest.approx(0.5)
    assert shift_mu(8192) == pytest.approx(0.9)
    assert shift_mu(4224) == pytest.approx(0.7)
    assert shift_mu(16384) == pytest.approx(0.9 + 0.4 * 8192 / 7936)  # extrapolates linearly
    custom = shift_mu(1024, base_shift=0.5, max_shift=1.15, base_seq_len=256, max_seq_len=4096)
    assert custom == pytest.approx(0.5 + 0.65 * 768 / 3840)
    config = SamplerConfig(steps=8, max_shift=1.15, max_seq_len=4096)
    torch.testing.assert_close(
        config_sigmas(config, 1024),
        flow_sigmas(8, mu=custom, shift_terminal=0.02),
    )


def test_one_step_with_terminal_is_defined() -> None:
    # diffusers divides 0 by 0 here; a one-step grid is just [1, 0].
    assert flow_sigmas(1, mu=0.8, shift_terminal=0.02).tolist() == [1.0, 0.0]


def test_schedule_errors() -> None:
    with pytest.raises(ValueError, match="either shift or mu"):
        flow_sigmas(4, shift=2.0, mu=0.5)
    with pytest.raises(ValueError, match="seq_len"):
        config_sigmas(SamplerConfig())
    with pytest.raises(ValueError, match="steps"):
        flow_sigmas(0)


# ----------------------------------------------------------------------------- Euler + CFG


def test_euler_recovers_gaussian_target_first_order() -> None:
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(64, 3, 4, generator=g, dtype=torch.float64)
    exact = M + S * noise
    errors = []
    for steps in (50, 100, 200):
        config = SamplerConfig(steps=steps, dynamic_shift=False, shift_terminal=None)
        x0 = sample_euler(gaussian_velocity, noise, config)
        assert x0.dtype == torch.float64
        errors.append((x0 - exact).abs().max().item())
    assert errors[-1] < 0.02
    # Euler is first order: halving the step halves the error.
    for coarse, fine in itertools.pairwise(errors):
        assert 1.8 < coarse / fine < 2.2


def test_euler_matches_diffusers_scheduler_loop() -> None:
    """Same trajectory as the QwenImage pipeline loop (scheduler.step, t = timestep / 1000)."""
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 16, 8, generator=g)  # (B, L, C) packed latents
    w_c = torch.randn(8, 8, generator=g) / 4
    w_u = torch.randn(8, 8, generator=g) / 4
    seen_t: list[float] = []

    def cond(x: Tensor, t: Tensor) -> Tensor:
        seen_t.append(t[0].item())
        return x @ w_c + t.view(-1, 1, 1)

    def uncond(x: Tensor, t: Tensor) -> Tensor:
        return x @ w_u - t.view(-1, 1, 1)

    config = SamplerConfig(steps=6, guidance_scale=4.0, channel_dim=-1)  # packed layout
    ours = sample_euler(cond, noise, config, uncond_velocity=uncond, seq_len=noise.shape[1])

    scheduler = _qwen_scheduler()
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=shift_mu(noise.shape[1]))
    latents = noise.clone()
    for timestep in scheduler.timesteps:
        t = (timestep / 1000).expand(latents.shape[0])
        v_c, v_u = latents @ w_c + t.view(-1, 1, 1), latents @ w_u - t.view(-1, 1, 1)
        comb = v_u + 4.0 * (v_c - v_u)  # the QwenImage pipeline's true CFG
        v = comb * (torch.norm(v_c, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
        latents = scheduler.step(v, timestep, latents, return_dict=False)[0]
    torch.testing.assert_close(ours, latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(seen_t), scheduler.timesteps / 1000)


def test_cfg_scale_one_is_conditional() -> None:
    g = torch.Generator().manual_seed(2)
    v_c, v_u = torch.randn(2, 2, 5, 6, generator=g)
    for renorm in ("none", "token", "sample"):
        torch.testing.assert_close(cfg_combine(v_c, v_u, 1.0, renorm=renorm), v_c)

    calls = {"uncond": 0}

    def uncond(x: Tensor, t: Tensor) -> Tensor:
        calls["uncond"] += 1
        return torch.zeros_like(x)

    noise = torch.randn(3, 4, generator=g)
    config = SamplerConfig(steps=5, dynamic_shift=False, guidance_scale=1.0)
    guided = sample_euler(gaussian_velocity, noise, config, uncond_velocity=uncond)
    torch.testing.assert_close(guided, sample_euler(gaussian_velocity, noise, config))
    assert calls["uncond"] == 0  # scale 1 skips the unconditional pass


def test_cfg_renorm_keeps_conditional_norm() -> None:
    g = torch.Generator().manual_seed(3)
    v_c = torch.randn(3, 7, 16, generator=g)
    v_u = torch.randn(3, 7, 16, generator=g)
    plain = cfg_combine(v_c, v_u, 5.0, renorm="none")
    torch.testing.assert_close(plain, v_u + 5.0 * (v_c - v_u))

    token = cfg_combine(v_c, v_u, 5.0, renorm="token", channel_dim=-1)  # packed (B, L, C)
    torch.testing.assert_close(token.norm(dim=-1), v_c.norm(dim=-1))
    # Only the length changes: same direction as the plain CFG prediction.
    cosine = torch.nn.functional.cosine_similarity(token, plain, dim=-1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine))

    sample = cfg_combine(v_c, v_u, 5.0, renorm="sample")
    torch.testing.assert_close(sample.flatten(1).norm(dim=1), v_c.flatten(1).norm(dim=1))
    torch.testing.assert_close(sample / plain, (sample / plain)[:, :1, :1].expand_as(plain))
    assert not torch.allclose(token, sample)


def test_cfg_token_renorm_is_per_position_over_channels_on_bchw() -> None:
    """On our transformer's (B, C, H, W) layout the token norm is over dim 1, per (h, w)."""
    g = torch.Generator().manual_seed(12)
    v_c = torch.randn(2, 4, 5, 6, generator=g)  # (B, C, H, W) with H != W != C
    v_u = torch.randn(2, 4, 5, 6, generator=g)
    combined = cfg_combine(v_c, v_u, 4.0, renorm="token")  # channel_dim=1 by default
    assert combined.shape == v_c.shape
    torch.testing.assert_close(combined.norm(dim=1), v_c.norm(dim=1))  # (B, H, W)
    plain = cfg_combine(v_c, v_u, 4.0, renorm="none")
    cosine = torch.nn.functional.cosine_similarity(combined, plain, dim=1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine))
    # The old behaviour (norm over the last dim: the width) does not keep the channel norm.
    old = cfg_combine(v_c, v_u, 4.0, renorm="token", channel_dim=-1)
    assert not torch.allclose(old.norm(dim=1), v_c.norm(dim=1), rtol=1e-2, atol=1e-2)
    # Negative dims name the same axis; the batch dim is refused.
    torch.testing.assert_close(cfg_combine(v_c, v_u, 4.0, channel_dim=-3), combined)
    for bad in (0, -4, 4):
        with pytest.raises(ValueError, match="channel_dim"):
            cfg_combine(v_c, v_u, 4.0, channel_dim=bad)
    with pytest.raises(ValueError, match="renorm"):
        cfg_combine(v_c, v_u, 4.0, renorm="pixel")  # type: ignore[arg-type]


def test_bchw_sampling_matches_packed_tokens() -> None:
    """qwen_image_sampler() on (B, C, H, W) gives the packed (B, L, C) guidance (p = 1)."""
    g = torch.Generator().manual_seed(13)
    b, c, h, w = 2, 4, 3, 5
    noise = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    w_c = torch.randn(c, c, generator=g, dtype=torch.float64) / 3
    w_u = torch.randn(c, c, generator=g, dtype=torch.float64) / 3

    def pack(x: Tensor) -> Tensor:
        return x.flatten(2).transpose(1, 2)  # (B, H*W, C)

    def unpack(x: Tensor) -> Tensor:
        return x.transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)

    def linear(weight: Tensor, sign: float) -> Callable[[Tensor, Tensor], Tensor]:
        """A per-position channel mixer on packed tokens, plus a time bias."""

        def velocity(tokens: Tensor, t: Tensor) -> Tensor:
            return tokens @ weight + sign * t.view(-1, 1, 1)

        return velocity

    def on_bchw(velocity: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
        return lambda x, t: unpack(velocity(pack(x), t))

    cond, uncond = linear(w_c, 1.0), linear(w_u, -1.0)
    config = qwen_image_sampler()
    config.steps = 5
    assert config.channel_dim == 1
    ours = sample_euler(
        on_bchw(cond), noise, config, uncond_velocity=on_bchw(uncond), seq_len=h * w
    )
    config.channel_dim = -1
    packed = sample_euler(cond, pack(noise), config, uncond_velocity=uncond, seq_len=h * w)
    torch.testing.assert_close(ours, unpack(packed))
    # channel_dim=-1 on (B, C, H, W) takes the norm over the width (the old default): wrong.
    wrong = sample_euler(
        on_bchw(cond), noise, config, uncond_velocity=on_bchw(uncond), seq_len=h * w
    )
    assert not torch.allclose(wrong, ours, rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------- config


def test_recipes_validate() -> None:
    qwen_image_sampler().validate()
    flow_grpo_sampler().validate()
    SamplerConfig(steps=4, sde_window=(0, 4), guidance_scale=0.0).validate()


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("steps", {"steps": 0}),
        ("shift", {"shift": 0.0}),
        ("shift", {"shift": -2.0}),
        ("max_shift", {"max_shift": math.nan}),
        ("base_seq_len", {"base_seq_len": 0}),
        ("max_seq_len", {"max_seq_len": 256}),
        ("shift_terminal", {"shift_terminal": 1.0}),
        ("shift_terminal", {"shift_terminal": -0.1}),
        ("guidance_scale", {"guidance_scale": -1.0}),
        ("guidance_scale", {"guidance_scale": math.inf}),
        ("cfg_renorm", {"cfg_renorm": "pixel"}),
        ("channel_dim", {"channel_dim": 0}),
        ("noise_level", {"noise_level": 0.0}),
        ("noise_level", {"noise_level": -0.7}),
        ("sde_window", {"sde_window": (5, 2)}),
        ("sde_window", {"sde_window": (3, 3)}),
        ("sde_window", {"sde_window": (-1, 2)}),
        ("sde_window", {"sde_window": (2, 11)}),
        ("log_prob_reduce", {"log_prob_reduce": "max"}),
    ],
)
def test_invalid_config_is_refused(field: str, kwargs: dict[str, object]) -> None:
    config = SamplerConfig(**{"steps": 10, **kwargs})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=field):
        config.validate()
    noise = torch.zeros(2, 3)
    # Every entry point validates before doing any work.
    with pytest.raises(ValueError, match=field):
        config_sigmas(config, 64)
    with pytest.raises(ValueError, match=field):
        sample_euler(gaussian_velocity, noise, config, seq_len=64)
    with pytest.raises(ValueError, match=field):
        sample_sde(gaussian_velocity, noise, config, seq_len=64)


# ----------------------------------------------------------------------------- SDE


def test_sde_step_samples_match_returned_mean_and_std() -> None:
    g = torch.Generator().manual_seed(4)
    x_t = torch.randn(1, 6, generator=g).expand(20000, 6).contiguous()
    v = torch.randn(1, 6, generator=g).expand(20000, 6).contiguous()
    step = sde_step(x_t, v, 0.6, 0.5, noise_level=0.7, generator=g)
    # Closed form: sigma_t^2 = a^2 t / (1 - t), std = sigma_t sqrt(t - t_next).
    sigma_sq = 0.49 * 0.6 / 0.4
    expected_std = math.sqrt(sigma_sq * 0.1)
    expected_mean = x_t[0] + (v[0] + sigma_sq / 1.2 * (x_t[0] + 0.4 * v[0])) * -0.1
    assert step.std.shape == (20000, 1)
    torch.testing.assert_close(step.std, torch.full_like(step.std, expected_std))
    torch.testing.assert_close(step.mean[0], expected_mean)
    # Empirical moments of the samples: standard errors are std / sqrt(2e4) ~ 0.7%.
    torch.testing.assert_close(
        step.x_next.mean(0), step.mean[0], atol=4 * expected_std / 141, rtol=0
    )
    torch.testing.assert_close(
        step.x_next.std(0), torch.full((6,), expected_std), atol=0.03 * expected_std, rtol=0
    )


def _normal_log_density(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Element-wise log N(x; mean, std^2) from torch.distributions (untyped upstream)."""
    density: Tensor = torch.distributions.Normal(mean, std).log_prob(x)  # type: ignore[no-untyped-call]
    return density


def test_sde_log_prob_is_gaussian_density() -> None:
    g = torch.Generator().manual_seed(5)
    x_t = torch.randn(4, 3, 5, generator=g)
    v = torch.randn(4, 3, 5, generator=g)
    t = torch.tensor([0.9, 0.7, 0.5, 0.2])
    t_next = t - 0.1
    given = torch.randn(4, 3, 5, generator=g)
    for reduce in ("mean", "sum"):
        step = sde_step(x_t, v, t, t_next, noise_level=0.8, x_next=given, reduce=reduce)
        assert torch.equal(step.x_next, given)
        density = _normal_log_density(given, step.mean, step.std)
        expected = density.mean(dim=(1, 2)) if reduce == "mean" else density.sum(dim=(1, 2))
        torch.testing.assert_close(step.log_prob, expected)
    # The sampled state's log-prob is also that density.
    sampled = sde_step(x_t, v, t, t_next, noise_level=0.8, generator=g)
    density = _normal_log_density(sampled.x_next, sampled.mean, sampled.std)
    torch.testing.assert_close(sampled.log_prob, density.mean(dim=(1, 2)))


def test_sde_log_prob_gradient_flows_through_velocity_only() -> None:
    g = torch.Generator().manual_seed(6)
    x_t = torch.randn(2, 4, generator=g)
    v = torch.randn(2, 4, generator=g, requires_grad=True)
    x_next = torch.randn(2, 4, generator=g, requires_grad=True)
    step = sde_step(x_t, v, 0.5, 0.4, noise_level=0.7, x_next=x_next)
    grad_v, grad_x_next = torch.autograd.grad(step.log_prob.sum(), [v, x_next], allow_unused=True)
    assert grad_v is not None
    assert bool((grad_v != 0).all())
    assert grad_x_next is None


def test_sde_step_at_t_one_is_finite() -> None:
    g = torch.Generator().manual_seed(7)
    x_t = torch.randn(2, 4, generator=g)
    step = sde_step(x_t, torch.randn(2, 4, generator=g), 1.0, 0.9, noise_level=0.7, generator=g)
    # sigma_1 uses 1 - t_next under the root: 0.7 * sqrt(1 / 0.1) * sqrt(0.1) = 0.7.
    torch.testing.assert_close(step.std, torch.full_like(step.std, 0.7))
    assert bool(torch.isfinite(step.log_prob).all())


def test_sde_step_zero_noise_limit_is_euler() -> None:
    g = torch.Generator().manual_seed(8)
    x_t = torch.randn(3, 5, generator=g, dtype=torch.float64)
    v = torch.randn(3, 5, generator=g, dtype=torch.float64)
    euler = euler_step(x_t, v, 0.5, 0.3)
    gaps = []
    for level in (1e-1, 1e-3, 1e-5):
        step = sde_step(x_t, v, 0.5, 0.3, noise_level=level, generator=g)
        gaps.append((step.x_next - euler).abs().max().item())
        assert (step.mean - euler).abs().max().item() < 10 * level**2
    assert gaps[0] > 100 * gaps[1] > 1e4 * gaps[2]
    assert gaps[-1] < 1e-4
    with pytest.raises(ValueError, match="noise_level"):
        sde_step(x_t, v, 0.5, 0.3, noise_level=0.0)


def test_sde_preserves_gaussian_marginal() -> None:
    """The SDE has the ODE's marginals: with the exact velocity it lands on N(M, S^2)."""
    g = torch.Generator().manual_seed(9)
    noise = torch.randn(4000, 8, generator=g, dtype=torch.float64)
    config = SamplerConfig(steps=50, dynamic_shift=False, shift_terminal=None, noise_level=0.7)
    global_state = torch.get_rng_state()
    x0 = sample_sde(gaussian_velocity, noise, config, generator=g).latents[-1]
    assert torch.equal(torch.get_rng_state(), global_state)  # only the local generator drew
    assert x0.mean().item() == pytest.approx(M, abs=0.02)
    assert x0.std().item() == pytest.approx(S, abs=0.02)
    # The noise really moved the samples off the ODE path.
    assert (x0 - (M + S * noise)).std().item() > 0.1


def test_sde_trajectory_log_probs_re_evaluate() -> None:
    g = torch.Generator().manual_seed(10)
    noise = torch.randn(3, 6, 4, generator=g)
    w = torch.randn(4, 4, generator=g) / 3

    def model(x: Tensor, t: Tensor) -> Tensor:
        return x @ w + t.view(-1, 1, 1)

    config = SamplerConfig(steps=6, noise_level=0.7, guidance_scale=3.0, sde_window=(1, 4))
    uncond = point_velocity(torch.zeros(3, 6, 4))
    traj = sample_sde(model, noise, config, uncond_velocity=uncond, seq_len=6, generator=g)
    assert traj.latents.shape == (7, 3, 6, 4)
    assert traj.log_probs.shape == (3, 6)
    assert traj.stochastic.tolist() == [False, True, True, True, False, False]
    assert bool((traj.log_probs[:, ~traj.stochastic] == 0).all())
    assert torch.equal(traj.latents[0], noise)

    t_all = traj.sigmas.tolist()
    for i in range(config.steps):
        x_t, t, t_next = traj.latents[i], t_all[i], t_all[i + 1]
        tb = torch.full((3,), t)
        v = cfg_combine(
            model(x_t, tb), uncond(x_t, tb), 3.0, renorm="token", channel_dim=config.channel_dim
        )
        if not traj.stochastic[i]:
            torch.testing.assert_close(traj.latents[i + 1], euler_step(x_t, v, t, t_next))
            continue
        again = sde_step(x_t, v, t, t_next, noise_level=0.7, x_next=traj.latents[i + 1])
        torch.testing.assert_close(again.log_prob, traj.log_probs[:, i])
        # Under different parameters the same transition scores differently.
        other = sde_step(x_t, 1.1 * v, t, t_next, noise_level=0.7, x_next=traj.latents[i + 1])
        assert not torch.allclose(other.log_prob, traj.log_probs[:, i])


# ----------------------------------------------------------------------------- few-step


def test_few_step_is_exact_on_a_linear_flow() -> None:
    g = torch.Generator().manual_seed(11)
    target = torch.randn(4, 2, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 2, 8, generator=g, dtype=torch.float64)
    velocity = point_velocity(target)
    for x0 in (
        sample_few_step(velocity, noise),
        sample_few_step(velocity, noise, steps=2, shift=3.0),
        sample_few_step(velocity, noise, [1.0, 0.75, 0.5, 0.25]),
        sample_few_step(velocity, noise, torch.tensor([1.0, 0.9, 0.3, 0.0])),
    ):
        torch.testing.assert_close(x0, target, atol=1e-12, rtol=0)
    # Starting below t = 1 takes noise as x_t there (a distilled student's grid).
    x_half = 0.5 * target + 0.5 * noise
    torch.testing.assert_close(sample_few_step(velocity, x_half, [0.5]), target)
    with pytest.raises(ValueError, match="decrease"):
        sample_few_step(velocity, noise, [1.0, 0.5, 0.7])
