#!/usr/bin/env python3
"""Benchmark (issue 19): every attention backend, and the lossy variants (token downsampling, head pruning), against the
`math` reference measured in the same run, through the tiny SDXL UNet at SDXL's high-resolution token counts.

  python bench/bench_attention.py             # latents 64², 128², 192²; forward pass; 3 interleaved rounds
                                              # (~10 min on a quiet 2-core machine, most of it `math` and `sliced` at 192²)
  python bench/bench_attention.py --quick     # latents 32², 48² forward + a 32² training step; under a minute (smoke test)
  python bench/bench_attention.py --train     # also a training step (forward + backward) at every size
  python bench/bench_attention.py --sizes 128 --reps 5 --json out.json [--device cuda]

Model: build_tiny_sdxl(seed=0).unet (widths 32/64/64, 4 heads of width 16 at the attention levels). At L×L latents
its level-1 self-attention sees (L/2)² tokens -- 1024, 4096, 9216 at 64², 128², 192², as SDXL's level 1 does at
512², 1024², 1536² -- and its level-2 / mid-block attention (L/4)². Batch 1 (--batch), timesteps 500, random
conditioning, eval mode, no_grad for the forward rows.

Rows (one per variant; unavailable backends are listed with the reason, not run):
  exact   every name in ztsnr_nb.policies.ATTENTION_BACKENDS, set on the whole UNet by set_attention_backend. Pass if
          max|out - out_math| <= tol * max(1, max|out_math|), tol = 1e-5 in float32 (3e-2 on CUDA for the kernels
          that compute in bf16: sdpa_flash, sdpa_cudnn, flash_attn).
  lossy   todo avg x2 / nearest x2 / avg x4: sdpa + set_token_downsampling(factor, method, max_depth=1) (level-1
          self-attention only); heads -25% / -50%: sdpa + the lowest-importance heads of every layer removed from the
          projections (Taylor importance of the v-prediction loss on 4 random calibration batches at 16² latents).
Columns: time = median over rounds of (variant time / math time in the same round) [min-max over rounds] (lossy rows
also ÷ sdpa, their base, in the last column); rounds
are interleaved and their order rotates, so the neighbours' load hits every variant alike. peak = peak bytes
allocated during one call (torch.profiler allocation events on a CPU, the allocator peak on CUDA) / math's;
deterministic, so one measurement. max|d| and relL2 = deviation of the UNet output (training rows: of the
gradients, max over parameters of max|g - g_math| / max|g_math|) from math's.
"""
from __future__ import annotations

import argparse, copy, json, statistics, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ztsnr_nb.models.attention import (BACKENDS, apply_head_pruning, backend_unavailable_reason, head_importance,  # noqa: E402
                                       peak_memory_bytes, plan_head_pruning, set_attention_backend, set_token_downsampling)
from ztsnr_nb.models.sdxl import Conditioning, build_tiny_sdxl, unet_forward  # noqa: E402
from ztsnr_nb.schedule import NoiseSchedule, add_noise, v_target  # noqa: E402

HALF_ON_CUDA = ('sdpa_flash', 'sdpa_cudnn', 'flash_attn')


def inputs(unet, B, L, seed=0, device='cpu'):
    "Latents (B, 4, L, L), timesteps and a random SDXL conditioning for the tiny UNet."
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    cond = Conditioning(torch.randn(B, 77, c.cross_attention_dim, generator=g),
                        torch.randn(B, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim, generator=g),
                        torch.tensor([[8. * L, 8. * L, 0., 0., 8. * L, 8. * L]]).repeat(B, 1))
    x = torch.randn(B, 4, L, L, generator=g)
    return x.to(device), torch.full((B,), 500, device=device), cond.to(device)


def importance(unet, device):
    "Taylor head importance of the v-prediction loss on 4 random calibration batches (16² latents, batch 2)."
    sched = NoiseSchedule.sdxl(ztsnr=True)
    def v_loss(m, b):
        x0, eps, t, cond = b
        ab = sched.alpha_bar.to(device)[t].view(-1, 1, 1, 1)
        return (unet_forward(m, add_noise(x0, eps, ab), t, cond) - v_target(x0, eps, ab)).pow(2).mean()
    batches = []
    for i in range(4):
        x0, _, cond = inputs(unet, 2, 16, seed=100 + i, device=device)
        g = torch.Generator().manual_seed(200 + i)
        batches.append((x0, torch.randn(x0.shape, generator=g).to(device), torch.randint(0, 1000, (2,), generator=g).to(device), cond))
    return head_importance(unet, v_loss, batches)


def variants(base, device):
    "name -> (kind, model or None, reason it is skipped)."
    out = {}
    for name in BACKENDS:
        reason = backend_unavailable_reason(name, device)
        out[name] = ('exact', None if reason else set_attention_backend(copy.deepcopy(base), name), reason)
    for label, method, f in (('todo avg x2', 'avg', 2), ('todo nearest x2', 'nearest', 2), ('todo avg x4', 'avg', 4)):
        m = set_token_downsampling(set_attention_backend(copy.deepcopy(base), 'sdpa'), f, method, max_depth=1)
        out[label] = ('lossy', m, None)
    imp = importance(set_attention_backend(base, 'sdpa'), device)
    for frac in (0.25, 0.5):
        m = apply_head_pruning(set_attention_backend(copy.deepcopy(base), 'sdpa'), plan_head_pruning(imp, frac, remove=True))
        out[f"heads -{int(frac * 100)}%"] = ('lossy', m, None)
    return out


def sync(device):
    if str(device).startswith('cuda'): torch.cuda.synchronize()


def measure(models, call, compare, reps, device):
    "Per variant: output (first call), peak bytes, per-round time ratios to math."
    res = {}
    for name, m in models.items():
        box = {}
        res[name] = {'peak': peak_memory_bytes(lambda: box.__setitem__('out', call(m)), device)}
        res[name]['out'] = box['out']
    ref = res['math']['out']
    for name in models: res[name].update(compare(res[name]['out'], ref))
    times = {n: [] for n in models}
    names = list(models)
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync(device); t0 = time.perf_counter(); call(models[name]); sync(device)
            times[name].append(time.perf_counter() - t0)
    for name in models:
        ratios = sorted(a / b for a, b in zip(times[name], times['math']))
        vs_sdpa = sorted(a / b for a, b in zip(times[name], times['sdpa'])) if 'sdpa' in times else None
        res[name].update(time_s=statistics.median(times[name]), ratio=ratios, ratio_sdpa=vs_sdpa)
        del res[name]['out']
    return res


def out_dev(o, ref):
    return {'maxabs': (o - ref).abs().max().item(), 'rel': ((o - ref).norm() / ref.norm()).item(), 'scale': ref.abs().max().item()}


def grad_dev(g, ref):
    worst = max((g[n] - ref[n]).abs().max().item() / (ref[n].abs().max().item() + 1e-12) for n in ref)
    rel = (sum((g[n] - ref[n]).pow(2).sum() for n in ref) / sum(ref[n].pow(2).sum() for n in ref)).sqrt().item()
    return {'maxabs': worst, 'rel': rel, 'scale': 1.0}


def tolerance(name, device):
    return 3e-2 if str(device).startswith('cuda') and name in HALF_ON_CUDA else 1e-5


def table(title, res, kinds, skipped, device):
    print(f"\n{title}")
    print(f"{'variant':20}{'kind':7}{'time ÷ math':>24}{'peak ÷ math':>13}{'max|d|':>10}{'relL2':>10}  check / lossy: time ÷ sdpa")
    m = res['math']
    for name, kind in kinds.items():
        if name in skipped:
            print(f"{name:20}{kind:7}  skipped: {skipped[name]}"); continue
        r = res[name]; q = r['ratio']
        s = r.get('ratio_sdpa')
        check = f"{statistics.median(s):.2f} [{s[0]:.2f}-{s[-1]:.2f}]" if kind == 'lossy' and s else ''
        if kind == 'exact':
            ok = r['maxabs'] <= tolerance(name, device) * max(1.0, r['scale'])
            check = f"{'ok' if ok else 'FAIL'} (tol {tolerance(name, device):.0e})"
        extra = f"   math: {m['time_s'] * 1000:.0f} ms, {m['peak'] / 2**20:.1f} MB" if name == 'math' else ''
        print(f"{name:20}{kind:7}{statistics.median(q):>11.2f} [{q[0]:.2f}-{q[-1]:.2f}]{r['peak'] / max(m['peak'], 1):>13.2f}"
              f"{r['maxabs']:>10.1e}{r['rel']:>10.1e}  {check}{extra}")
    return all(res[n]['maxabs'] <= tolerance(n, device) * max(1.0, res[n]['scale'])
               for n, k in kinds.items() if k == 'exact' and n not in skipped)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--quick', action='store_true', help='32² and 48² forward + a 32² training step (< 1 min on a CPU)')
    ap.add_argument('--sizes', type=int, nargs='+', help='latent sides (default 64 128 192)')
    ap.add_argument('--train', action='store_true', help='also a training step (forward + backward) at every size')
    ap.add_argument('--reps', type=int, default=3, help='interleaved timing rounds (default 3)')
    ap.add_argument('--batch', type=int, default=1)
    ap.add_argument('--threads', type=int, default=1, help='torch threads (default 1: the test machine is shared)')
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--json', help='also write the results here')
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.backends.cudnn.allow_tf32 = False; torch.backends.cuda.matmul.allow_tf32 = False   # math is the fp32 reference
    sizes = a.sizes or ([32, 48] if a.quick else [64, 128, 192])
    train_sizes = sizes if a.train else ([min(sizes)] if a.quick else [])
    base = build_tiny_sdxl(seed=0).unet.to(a.device).eval()
    vs = variants(base, a.device)
    kinds = {n: k for n, (k, _, _) in vs.items()}
    skipped = {n: why for n, (_, m, why) in vs.items() if m is None}
    models = {n: m for n, (_, m, _) in vs.items() if m is not None}
    print(f"torch {torch.__version__}, device {a.device}, {a.threads} thread(s), batch {a.batch}, {a.reps} rounds; "
          f"tiny SDXL UNet, level-1 self-attention tokens = (L/2)²")
    report, ok = {}, True
    for L in sizes:
        x, t, cond = inputs(base, a.batch, L, device=a.device)
        def fwd(m):
            with torch.no_grad(): return unet_forward(m, x, t, cond)
        res = measure(models, fwd, out_dev, a.reps, a.device)
        ok &= table(f"forward, latents {L}x{L} ({(L // 2) ** 2} level-1 tokens)", res, kinds, skipped, a.device)
        report[f"forward_{L}"] = res
    for L in train_sizes:
        x, t, cond = inputs(base, a.batch, L, device=a.device)
        def step(m):
            m.zero_grad(set_to_none=True)
            unet_forward(m, x, t, cond).pow(2).mean().backward()
            return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
        exact = {n: m for n, m in models.items() if kinds[n] == 'exact'}   # pruned models have other parameter shapes
        lossy = {n: m for n, m in models.items() if kinds[n] == 'lossy' and n.startswith('todo')}
        res = measure({**exact, **lossy}, step, grad_dev, a.reps, a.device)
        ok &= table(f"training step (forward + backward), latents {L}x{L}; deviation of the gradients",
                    res, {n: k for n, k in kinds.items() if n in res or n in skipped}, skipped, a.device)
        report[f"train_{L}"] = res
    if a.json: Path(a.json).write_text(json.dumps({'device': a.device, 'torch': torch.__version__, 'results': report}, indent=1))
    print("\nall exact backends within tolerance" if ok else "\nSOME EXACT BACKEND IS OUTSIDE ITS TOLERANCE")
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
