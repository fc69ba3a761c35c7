"Property tests for ztsnr_nb.schedule beyond the notebook's: import hygiene, random shapes/dtypes/schedules."
import math, subprocess, sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

from ztsnr_nb.policies import SPACINGS, TERMINAL_SIGMAS, LOSS_WEIGHTINGS
from ztsnr_nb.schedule import (NoiseSchedule, betas_scaled_linear, betas_linear,
                               add_noise, v_target, x0_from_v, eps_from_v, cfg_rescale, sample_train_timesteps,
                               sample_ddim, sample_euler, SolidOracle, alpha_bar_from_sigma)

FAST = settings(max_examples=20, deadline=None)


def test_import_is_light():
    "The exported module must not pull in notebook/plotting/test tooling (nor diffusers) at import time (fastcore.basics' @patch is fine)."
    code = ("import sys, ztsnr_nb.schedule; "
            "print([m for m in ('nbdev', 'fastcore.test', 'matplotlib', 'ipywidgets', 'hypothesis', 'diffusers') if m in sys.modules])")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == '[]', r.stdout


@FAST
@given(st.integers(1, 4), st.integers(0, 3), st.sampled_from([torch.float32, torch.float64]), st.integers(0, 2**31 - 1))
def test_v_algebra_roundtrip_random_shapes(B, extra_dims, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (B,) + tuple(torch.randint(1, 4, (extra_dims,), generator=g).tolist())
    x0, eps = torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)
    ab = torch.rand(B, generator=g, dtype=torch.float64)
    ab[0] = 0.0                                                     # always include the ZTSNR terminal
    xt, v = add_noise(x0, eps, ab), v_target(x0, eps, ab)
    assert xt.dtype == dtype and v.dtype == dtype                   # float64 alpha_bar does not promote the data
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(x0_from_v(xt, v, ab), x0, atol=tol) and torch.allclose(eps_from_v(xt, v, ab), eps, atol=tol)


@FAST
@given(st.floats(1e-5, 1e-3), st.floats(5e-3, 3e-2), st.booleans(), st.booleans())
def test_weights_finite_on_random_rescaled_schedules(b0, b1, scaled, ztsnr):
    betas = (betas_scaled_linear if scaled else betas_linear)(1000, b0, b1)
    s = NoiseSchedule.from_betas(betas, ztsnr=ztsnr)
    assert s.ztsnr == ztsnr and (s.alpha_bar[-1].item() == 0) == ztsnr
    t = torch.arange(1000)
    for kind in LOSS_WEIGHTINGS:
        for pred in ('v', 'sample') + (() if ztsnr else ('epsilon',)):
            for term in ('one', 'zero', 0.5):
                w = s.loss_weight(t, kind, pred, terminal_weight=term)
                assert torch.isfinite(w).all() and (w >= 0).all()
    if ztsnr:
        assert s.loss_weight(t, terminal_weight='zero')[-1] == 0 and s.loss_weight(t)[-1] == 1
        with pytest.raises(ValueError, match='zero terminal SNR'): s.loss_weight(t, prediction='epsilon')


@FAST
@given(st.integers(1, 200), st.sampled_from(SPACINGS), st.sampled_from(list(TERMINAL_SIGMAS) + [1e4]), st.booleans())
def test_sampling_sigmas_monotone(n, spacing, terminal, ztsnr):
    s = NoiseSchedule.sdxl(ztsnr=ztsnr).sampling_sigmas(n, spacing, terminal)
    assert len(s) == n + 1 and s[-1] == 0 and torch.isfinite(s).all() and (s[1:] <= s[:-1]).all()
    t = NoiseSchedule.sdxl().sampling_timesteps(n, spacing)
    assert (t[1:] < t[:-1]).all() and t.min() >= 0 and t.max() <= 999


@FAST
@given(st.sampled_from(['uniform', 'logit_normal', 'high_noise']), st.integers(1, 64), st.integers(0, 10**6))
def test_train_timesteps_seeded_in_range(dist, B, seed):
    a = sample_train_timesteps(B, generator=torch.Generator().manual_seed(seed), dist=dist)
    b = sample_train_timesteps(B, generator=torch.Generator().manual_seed(seed), dist=dist)
    assert torch.equal(a, b) and a.dtype == torch.long and a.min() >= 0 and a.max() <= 999


@FAST
@given(st.integers(1, 3), st.floats(1.0, 15.0), st.integers(0, 1000))
def test_cfg_rescale_std_identity(B, w, seed):
    g = torch.Generator().manual_seed(seed)
    xn, xp = torch.randn(B, 3, 5, 5, generator=g), 2 * torch.randn(B, 3, 5, 5, generator=g) + 0.5
    r = cfg_rescale(xn, xp, w, phi=1.0)
    assert torch.allclose(r.std(dim=(1, 2, 3)), xp.std(dim=(1, 2, 3)), rtol=1e-4)


def test_oracle_samplers_agree_small():
    "Euler (diffusers terminal) and DDIM (alpha_bar clamped to 2^-24) run the same math on a small latent."
    s, orc = NoiseSchedule.sdxl(), SolidOracle(mu=0.6, s=0.2)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    a = s.sampling_alpha_bars(12); a[0] = 2.0 ** -24
    sig = s.sampling_sigmas(12)
    x_d = sample_ddim(orc.v, z, a)
    x_e = sample_euler(orc.denoise, z * math.sqrt(sig[0].item() ** 2 + 1), sig)
    assert torch.allclose(x_d, x_e, atol=1e-4)
    assert abs(sample_ddim(orc.v, torch.cat([z, -z]), s.sampling_alpha_bars(12)).mean().item() - 0.6) < 0.01
