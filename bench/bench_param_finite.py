#!/usr/bin/env python3
"""Benchmark (issue 11, item 3): the cost of `params_finite` (the fused finiteness check of every trained parameter
that the trainer runs after each optimizer step) against a whole training step.

  python bench/bench_param_finite.py               # 5 rounds x 6 interleaved steps, tiny and ~40M UNet, 1 thread
  python bench/bench_param_finite.py --quick       # smoke run (seconds)
  python bench/bench_param_finite.py --threads 2 --rounds 7 --json out.json

One step = UNet forward on a batch of cached-latent-sized inputs, MSE against a fixed target, backward,
clip_grad_norm_(1.0), AdamW(foreach=True).step, zero_grad(set_to_none) -- the bare step of bench/bench_train.py.
Two variants run alternately step by step (the order rotating), so the neighbours' load hits both alike:
  plain      the step;
  checked    the step, then `params_finite(unet.parameters())` (one fused inf-norm per dtype, one host sync).
Reported per model: the check alone (median of 20 calls per round), the step (median per round), the direct ratio
check/step per round, and the interleaved ratio median(checked)/median(plain) - 1 per round; each as the median
over rounds with min..max (the spread). The direct ratio is the number to read: the interleaved one is the same
quantity buried in the step's own noise on a shared machine.
"""
from __future__ import annotations

import argparse, json, statistics, sys, time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ztsnr_nb.models.sdxl import Conditioning, TinySDXLConfig, build_unet, unet_forward  # noqa: E402
from ztsnr_nb.training.checkpointing import params_finite  # noqa: E402

UNET_40M = TinySDXLConfig(block_out_channels=(64, 128, 256), layers_per_block=2, transformer_layers_per_block=(1, 2, 3),
                          attention_head_dim=(2, 4, 8))     # the model of bench/bench_train.py


def make(cfg: TinySDXLConfig, batch: int, side: int):
    "(unet, params, step function) with fixed random inputs."
    unet = build_unet(cfg, seed=0).train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    g = torch.Generator().manual_seed(0)
    c = unet.config
    x = torch.randn(batch, c.in_channels, side, side, generator=g)
    target = torch.randn(batch, c.out_channels, side, side, generator=g)
    cond = Conditioning(torch.randn(batch, 77, c.cross_attention_dim, generator=g),
                        torch.randn(batch, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim, generator=g),
                        torch.tensor([[side * 8.0, side * 8, 0, 0, side * 8, side * 8]] * batch))
    t = torch.randint(0, 1000, (batch,), generator=g)
    def step():
        loss = F.mse_loss(unet_forward(unet, x, t, cond).float(), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        return loss.item()
    return unet, params, step


def med(xs): return statistics.median(xs)
def spread(xs): return f"{med(xs):.4%} ({min(xs):.4%}..{max(xs):.4%})"


def bench(name, cfg, batch, side, rounds, steps, checks=20) -> dict:
    unet, params, step = make(cfg, batch, side)
    check = lambda: params_finite(params)
    step(); step(); check()                                                    # warm-up
    direct, inter, t_steps, t_checks = [], [], [], []
    for r in range(rounds):
        times = {'plain': [], 'checked': []}
        for i in range(steps):
            order = ('plain', 'checked') if (i + r) % 2 == 0 else ('checked', 'plain')
            for v in order:
                t0 = time.perf_counter(); step()
                if v == 'checked': assert check()
                times[v].append(time.perf_counter() - t0)
        cs = []
        for _ in range(checks):
            t0 = time.perf_counter(); check(); cs.append(time.perf_counter() - t0)
        ts, tc = med(times['plain']), med(cs)
        t_steps.append(ts); t_checks.append(tc)
        direct.append(tc / ts); inter.append(med(times['checked']) / ts - 1)
    n = sum(p.numel() for p in params)
    res = dict(model=name, params_M=round(n / 1e6, 2), tensors=len(params), batch=batch, latent=side,
               step_ms=[round(x * 1e3, 2) for x in t_steps], check_ms=[round(x * 1e3, 4) for x in t_checks],
               direct_ratio=direct, interleaved_ratio=inter)
    print(f"{name}: {n / 1e6:.2f} M parameters in {len(params)} tensors, batch {batch} of {side}x{side} latents")
    print(f"  step {med(t_steps) * 1e3:.1f} ms ({min(t_steps) * 1e3:.1f}..{max(t_steps) * 1e3:.1f}), "
          f"params_finite {med(t_checks) * 1e3:.3f} ms ({min(t_checks) * 1e3:.3f}..{max(t_checks) * 1e3:.3f})")
    print(f"  check / step (direct, {rounds} rounds):          {spread(direct)}")
    print(f"  checked / plain - 1 (interleaved, {rounds} rounds): {spread(inter)}")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--rounds', type=int, default=5); ap.add_argument('--steps', type=int, default=6)
    ap.add_argument('--threads', type=int, default=1); ap.add_argument('--quick', action='store_true')
    ap.add_argument('--json', type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.quick: a.rounds, a.steps = 2, 2
    print(f"torch {torch.__version__}, {a.threads} thread(s), {a.rounds} rounds x {a.steps} interleaved steps")
    out = [bench('tiny UNet (build_tiny_sdxl)', TinySDXLConfig(), 2, 16, a.rounds, a.steps)]
    if not a.quick: out.append(bench('~40M UNet (bench_train)', UNET_40M, 4, 32, a.rounds, a.steps))
    if a.json: a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
