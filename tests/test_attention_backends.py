"""Attention backends (issue 19): CUDA-only backends refuse to run on a CPU with the reason; exact backends equal the
math reference and pass gradients; token downsampling and head pruning train; the bench's --quick mode runs."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ztsnr_nb.models import attention as A
from ztsnr_nb.models.sdxl import Conditioning, build_tiny_sdxl, unet_forward

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


@pytest.fixture(scope='module')
def unet():
    return build_tiny_sdxl(seed=0).unet


def inputs(unet, B=2, L=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    cond = Conditioning(torch.randn(B, 77, c.cross_attention_dim, generator=g),
                        torch.randn(B, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim, generator=g),
                        torch.tensor([[8. * L, 8. * L, 0., 0., 8. * L, 8. * L]]).repeat(B, 1))
    return torch.randn(B, 4, L, L, generator=g), torch.tensor([999, 300])[:B], cond


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU-only refusal')
@pytest.mark.parametrize('name, words', [
    ('xformers', ['xformers package is not installed']),
    ('flash_attn', ['flash-attn package is not installed', 'CUDA only', 'no CUDA device']),
    ('sdpa_mem_efficient', ['memory-efficient SDPA kernel runs on CUDA only', 'no CUDA device']),
    ('sdpa_cudnn', ['cuDNN SDPA kernel runs on CUDA only', 'no CUDA device'])])
def test_cuda_only_backends_refused_on_cpu(unet, name, words):
    A.set_attention_backend(unet, 'sdpa')
    before = A.attention_backend(unet)
    with pytest.raises(ValueError) as e:
        A.set_attention_backend(unet, name)
    msg = str(e.value)
    assert f"attention backend {name!r} is unavailable" in msg and "Use 'sdpa'" in msg
    for w in words: assert w in msg, (w, msg)
    assert A.attention_backend(unet) == before          # nothing half-switched
    assert name not in A.available_backends('cpu')


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU-only refusal')
def test_flash_attn_installed_but_no_cuda(unet, monkeypatch):
    monkeypatch.setattr(A, '_flash_attn_installed', lambda: True)
    with pytest.raises(ValueError, match='flash-attn runs on CUDA only'):
        A.set_attention_backend(unet, 'flash_attn')


@pytest.mark.parametrize('chunk_size', [None, 5, (5, 4), (3, 64)])
@pytest.mark.parametrize('masked', [False, True])
def test_chunked_equals_math_forward_and_backward(chunk_size, masked):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, n, 16) for n in (17, 13, 13))
    mask = None
    if masked:
        mask = torch.zeros(2, 1, 1, 13); mask[0, ..., -3:] = -1e4
    res = {}
    for name, fn in (('math', A.attention_math), ('chunked', lambda *a: A.attention_chunked(*a, chunk_size=chunk_size))):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        o = fn(qq, kk, vv, 0.25, mask)
        (o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum().backward()
        res[name] = (o, qq.grad, kk.grad, vv.grad)
    for a, b in zip(res['math'], res['chunked']):
        assert (a - b).abs().max() < 1e-5


def v_loss(m, x, t, cond):
    return (unet_forward(m, x, t, cond) - x.flip(0)).pow(2).mean()


def test_training_step_every_backend(unet):
    "A forward/backward through the tiny UNet for every backend that runs here, plus token downsampling and head masks."
    x, t, cond = inputs(unet)
    def grads(m):
        m.train(); m.zero_grad(set_to_none=True); v_loss(m, x, t, cond).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    ref = grads(A.set_attention_backend(unet, 'math'))
    assert len(ref) == len(list(unet.parameters()))
    for b in A.available_backends('cpu'):
        g = grads(A.set_attention_backend(unet, b))
        assert set(g) == set(ref)
        assert max((g[n] - ref[n]).abs().max() / (ref[n].abs().max() + 1e-12) for n in ref) < 1e-3, b
    todo = A.set_token_downsampling(copy.deepcopy(A.set_attention_backend(unet, 'chunked')), 2, 'avg', max_depth=1)
    imp = {n: torch.arange(a.heads, dtype=torch.float32) for n, a in A.attention_modules(unet).items()}
    pruned = A.apply_head_pruning(copy.deepcopy(A.set_attention_backend(unet, 'sdpa')), A.plan_head_pruning(imp, 0.25))
    for m in (todo, pruned):
        g = grads(m)
        assert set(g) == set(ref) and all(torch.isfinite(v).all() for v in g.values())
        assert any((g[n] - ref[n]).abs().max() > 1e-6 for n in ref)   # lossy: gradients differ from full attention
    A.set_attention_backend(unet, 'sdpa'); unet.eval()


def test_token_downsampling_threshold_and_off(unet):
    x, t, cond = inputs(unet)
    A.set_attention_backend(unet, 'sdpa')
    with torch.no_grad(): full = unet_forward(unet, x, t, cond)
    A.set_token_downsampling(unet, 2, 'nearest', max_depth=1, min_tokens=8 * 8 + 1)     # level 1 has 8x8 tokens here
    with torch.no_grad(): assert torch.equal(unet_forward(unet, x, t, cond), full)
    A.set_token_downsampling(unet, 2, 'nearest', max_depth=1, min_tokens=8 * 8)
    with torch.no_grad(): assert not torch.equal(unet_forward(unet, x, t, cond), full)
    A.set_token_downsampling(unet, factor=1)
    assert A.attention_backend(unet) == {'AttnProcessor2_0': len(unet.attn_processors)}
    with torch.no_grad(): assert torch.equal(unet_forward(unet, x, t, cond), full)


def test_head_pruning_saved_next_to_model_and_reloaded(unet, tmp_path):
    from safetensors.torch import load_file, save_file
    imp = {n: torch.rand(a.heads, generator=torch.Generator().manual_seed(3)) for n, a in A.attention_modules(unet).items()}
    plan = A.plan_head_pruning(imp, 0.5, remove=True, method='test')
    pruned = A.apply_head_pruning(copy.deepcopy(A.set_attention_backend(unet, 'sdpa')), plan)
    A.save_head_pruning(plan, tmp_path)
    save_file(pruned.state_dict(), str(tmp_path / 'unet.safetensors'))
    again = A.apply_head_pruning(build_tiny_sdxl(seed=5).unet, A.load_head_pruning(tmp_path))
    again.load_state_dict(load_file(str(tmp_path / 'unet.safetensors')))
    x, t, cond = inputs(unet)
    with torch.no_grad(): assert torch.allclose(unet_forward(again, x, t, cond), unet_forward(pruned, x, t, cond), atol=1e-6)
    (tmp_path / A.HEAD_PRUNING_FILE).write_text('{not json')
    with pytest.raises(ValueError, match='not valid JSON'):
        A.load_head_pruning(tmp_path)


def test_bench_quick_runs():
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, str(ROOT / 'bench' / 'bench_attention.py'), '--quick', '--sizes', '32', '--reps', '1'],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for needle in ('forward, latents 32x32', 'training step', 'chunked', 'todo avg x2', 'heads -50%', 'skipped:',
                   'all exact backends within tolerance'):
        assert needle in r.stdout, needle
