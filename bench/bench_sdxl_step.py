#!/usr/bin/env python3
"""Benchmark (issue 17, item 8): one SDXL UNet training step on a GPU -- step time, peak memory and MFU.

  python bench/bench_sdxl_step.py                    # GPU: real SDXL UNet (random weights), 1024², bf16, default sweep
  python bench/bench_sdxl_step.py --cpu-smoke        # CI: the tiny UNet on the CPU through every code path (< 1 min;
                                                     # --quick is the same)
  python bench/bench_sdxl_step.py --batch 1 2 4 8 --checkpointing off on --attention sdpa xformers \\
        --optimizer adamw_fused adamw8bit adafactor --ema device cpu --memory-format contiguous channels_last \\
        [--compile] [--sweep oat|full] [--steps 10 --warmup 3] [--peak-tflops 989] [--budget-s 420] [--json out.json]

Model: UNet2DConditionModel(**sdxl_unet_config()) -- the SDXL base 1.0 UNet, 2.57 B parameters -- built directly on
the GPU with random weights (no download); fp32 master weights, bf16 autocast (what the trainer does with
mixed_precision = 'bf16'); latents 4 x 128 x 128 (1024² pixels), 77-token context of width 2048, pooled 1280 +
6 time ids. One step = forward, MSE against a fixed random target, backward, clip_grad_norm_(1.0), optimizer step,
zero_grad(set_to_none), EMA update (interval 1, fp32 shadow on the GPU or in CPU memory).

Variants: batch 1-8; gradient checkpointing off/on; attention SDPA vs xformers; fused AdamW vs 8-bit AdamW
(bitsandbytes) vs Adafactor (transformers; relative_step off); EMA on the device vs on the CPU; contiguous vs
channels-last weights; optionally torch.compile. The 'oat' sweep (default) runs batch x checkpointing with the
reference settings (sdpa, adamw_fused, EMA on device, contiguous), then changes one setting at a time from that
reference at --fixed-batch; 'full' runs the cartesian product. A variant whose package or device is missing is
reported as skipped with the reason; one that runs out of memory is reported as OOM (peak at the failure).

Timing: --warmup steps, then --steps synchronised steps; reported: median step time with min..max (spread), img/s,
peak allocated / reserved memory (reset per variant), MFU and HFU, and the img/s ratio against the reference
variant of the same batch and checkpointing measured in the same run.
FLOPs are analytic (ztsnr_nb.training.device.unet_forward_flops, from the UNet config), checked against PyTorch's
FlopCounterMode on the meta device and against RESEARCH §7 (6.76 TFLOP per 1024² forward). Model FLOPs per step =
3 x forward x batch (MFU); with checkpointing the hardware does 4 x (HFU). Peak: the GPU's dense bf16 datasheet
figure (ztsnr_nb.training.device.PEAK_BF16_TFLOPS) or --peak-tflops.
--cpu-smoke: the tiny UNet of build_tiny_sdxl(seed=0) at 64² pixels on the CPU (fp32; --amp bf16 adds the autocast
path, 3x slower on a CPU), batch 1-2, one warm-up and two timed steps per variant, every switch; it validates the
harness, not performance.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ztsnr_nb.training.device import (configure_allocator, cpu_rss_peak_bytes, is_oom, mfu, peak_bf16_flops,  # noqa: E402
                                      set_cudnn_benchmark, set_tf32, to_channels_last, training_step_flops,
                                      unet_forward_flops)

import torch  # noqa: E402  (after configure_allocator is importable; CUDA is not touched before main() configures it)
import torch.nn.functional as F  # noqa: E402

GB = 1024 ** 3
REF = {'attention': 'sdpa', 'optimizer': 'adamw_fused', 'ema': 'device', 'memory_format': 'contiguous', 'compile': False}
RESEARCH_TFLOP_1024 = 6.76


def _ema_class():
    try: from ztsnr_nb.training.ema import EMA            # the module's home after the layout refactor
    except ImportError: from ztsnr_nb.training.loss import EMA
    return EMA


# -- setup -----------------------------------------------------------------------------------------------------------
def build_unet(args, device):
    "The real SDXL UNet (random weights, built on the device) or, for --cpu-smoke, the tiny one."
    from diffusers import UNet2DConditionModel
    if args.cpu_smoke:
        from ztsnr_nb.models.sdxl import build_tiny_sdxl
        return build_tiny_sdxl(seed=0).unet.to(device)
    from ztsnr_nb.models.sdxl import sdxl_unet_config
    torch.manual_seed(0)
    with torch.device(device): return UNet2DConditionModel(**sdxl_unet_config())


def make_inputs(unet, batch, resolution, device):
    "Fixed random inputs of one step: x_t, t, target, context, pooled, time ids (the values do not change the cost)."
    c = unet.config
    g = torch.Generator(device='cpu').manual_seed(batch)
    side = resolution // 8
    pe = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    r = lambda *s: torch.randn(*s, generator=g).to(device)
    return dict(x=r(batch, 4, side, side), t=torch.randint(0, 1000, (batch,), generator=g).to(device), target=r(batch, 4, side, side),
                ctx=r(batch, 77, c.cross_attention_dim), pooled=r(batch, pe), time_ids=r(batch, 6))


def make_optimizer(name, params):
    "(optimizer, None) or (None, reason it cannot run here)."
    if name == 'adamw_fused':
        return torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2, fused=True), None
    if name == 'adamw8bit':
        try: import bitsandbytes as bnb
        except ImportError: return None, 'bitsandbytes is not installed (pip install bitsandbytes)'
        if not torch.cuda.is_available(): return None, 'bitsandbytes 8-bit AdamW needs CUDA'
        return bnb.optim.AdamW8bit(params, lr=1e-5, weight_decay=1e-2), None
    if name == 'adafactor':
        from transformers.optimization import Adafactor
        return Adafactor(params, lr=1e-5, relative_step=False, scale_parameter=False, warmup_init=False, weight_decay=1e-2), None
    return None, f'unknown optimizer {name!r}'


def set_attention(unet, name):
    "None, or the reason the backend cannot run here."
    from ztsnr_nb.models.attention import set_attention_backend, xformers_unavailable_reason
    if name == 'xformers' and (why := xformers_unavailable_reason()): return why
    set_attention_backend(unet, name)
    return None


# -- one variant ---------------------------------------------------------------------------------------------------------
def _free(device):
    "Drop the previous variant's tensors from the GPU (gc first: cycles can hold them); nothing to do on the CPU."
    if device.type == 'cuda': gc.collect(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(device)


def _sync(device):
    if device.type == 'cuda': torch.cuda.synchronize(device)


def run_variant(unet, v: dict, args, device, flops_fwd: float, peak: float | None) -> dict:
    "Measure one variant; returns its row (status ok | skipped | OOM)."
    from ztsnr_nb.models.attention import set_gradient_checkpointing
    row = dict(v, status='ok', reason='')
    why = set_attention(unet, v['attention'])
    if why: return dict(row, status='skipped', reason=why)
    set_gradient_checkpointing(unet, v['checkpointing'] == 'on')
    if v['memory_format'] == 'channels_last':
        if device.type != 'cuda' and not args.cpu_smoke: return dict(row, status='skipped', reason='channels-last is a CUDA switch')
        to_channels_last(unet)
    else: unet.to(memory_format=torch.contiguous_format)
    opt = ema = inputs = None
    _free(device)
    try:
        params = [p for p in unet.parameters() if p.requires_grad]
        opt, why = make_optimizer(v['optimizer'], params)
        if why: return dict(row, status='skipped', reason=why)
        ema = _ema_class()(unet, device='cpu' if v['ema'] == 'cpu' else None) if v['ema'] != 'off' else None
        inputs = make_inputs(unet, v['batch'], args.resolution, device)
        model = torch.compile(unet) if v['compile'] else unet
        times, step = [], 0
        for i in range(args.warmup + args.steps):
            _sync(device); t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == 'bf16'):
                pred = model(inputs['x'], inputs['t'], encoder_hidden_states=inputs['ctx'],
                             added_cond_kwargs={'text_embeds': inputs['pooled'], 'time_ids': inputs['time_ids']}).sample
            loss = F.mse_loss(pred.float(), inputs['target'])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step(); opt.zero_grad(set_to_none=True)
            if ema is not None: ema.update(unet, step)
            step += 1
            _sync(device)
            if i >= args.warmup: times.append(time.perf_counter() - t0)
        del pred, loss
    except Exception as e:
        if not is_oom(e): raise
        row.update(status='OOM', reason=str(e).strip().splitlines()[0][:160])
        times = []
    finally:
        opt = ema = inputs = None
        unet.zero_grad(set_to_none=True)     # an OOM mid-backward leaves gradients behind
    if device.type == 'cuda':
        row.update(peak_alloc_gb=torch.cuda.max_memory_allocated(device) / GB, peak_reserved_gb=torch.cuda.max_memory_reserved(device) / GB)
    else:
        row.update(peak_rss_gb=cpu_rss_peak_bytes() / GB)
    _free(device)
    if not times: return row
    med = statistics.median(times)
    model_f, hw_f = training_step_flops(flops_fwd * v['batch'], v['checkpointing'] == 'on')
    row.update(step_s=med, step_min_s=min(times), step_max_s=max(times), img_per_s=v['batch'] / med,
               tflops_per_s=model_f / med / 1e12,
               mfu=mfu(model_f, med, peak) if peak else None, hfu=mfu(hw_f, med, peak) if peak else None)
    return row


# -- the sweep -----------------------------------------------------------------------------------------------------------
def variants(args) -> list[dict]:
    "The variants to run, in order: batch x checkpointing at the reference, then one change at a time (oat) or all (full)."
    dims = {'attention': args.attention, 'optimizer': args.optimizer, 'ema': args.ema, 'memory_format': args.memory_format,
            'compile': [False, True] if args.compile else [False]}
    out = []
    if args.sweep == 'full':
        keys = list(dims)
        for b, ck, *rest in itertools.product(args.batch, args.checkpointing, *dims.values()):
            out.append(dict(batch=b, checkpointing=ck, **dict(zip(keys, rest))))
        return out
    for b, ck in itertools.product(args.batch, args.checkpointing): out.append(dict(batch=b, checkpointing=ck, **REF))
    fb = args.fixed_batch or (min(args.batch) if args.cpu_smoke else max(args.batch))
    for k, vals in dims.items():
        for val in vals:
            if val != REF[k]: out.append(dict(batch=fb, checkpointing=args.fixed_checkpointing, **dict(REF, **{k: val})))
    return out


def flop_check(unet_config: dict, resolution: int) -> dict:
    "Analytic forward FLOPs vs FlopCounterMode on the meta device (and RESEARCH §7 for the real UNet at 1024²)."
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    c = unet_config
    with torch.device('meta'):
        u = UNet2DConditionModel(**c)
        pe = c['projection_class_embeddings_input_dim'] - 6 * c['addition_time_embed_dim']
        x, t = torch.randn(1, 4, resolution // 8, resolution // 8), torch.tensor([500])
        kw = dict(encoder_hidden_states=torch.randn(1, 77, c['cross_attention_dim']),
                  added_cond_kwargs={'text_embeds': torch.randn(1, pe), 'time_ids': torch.randn(1, 6)})
    with FlopCounterMode(display=False) as fc: u(x, t, **kw)
    return {'analytic': unet_forward_flops(c, resolution, resolution), 'flop_counter': fc.get_total_flops()}


def fmt(r: dict, ref_ips: float | None) -> str:
    head = f"{r['batch']:>3} {r['checkpointing']:>4} {r['attention']:>8} {r['optimizer']:>11} {r['ema']:>6} {r['memory_format'][:8]:>8} {'yes' if r['compile'] else 'no':>4}"
    mem = f"{r.get('peak_alloc_gb', r.get('peak_rss_gb', float('nan'))):6.1f}"
    if r['status'] != 'ok': return f"{head} | {r['status']}: {r['reason']}" + (f" (peak {mem.strip()} GB)" if r['status'] == 'OOM' else '')
    pct = lambda x: f'{x:6.1%}' if x is not None else '   n/a'
    ratio = f"{r['img_per_s'] / ref_ips:5.2f}" if ref_ips else '    -'
    return (f"{head} | {r['step_s'] * 1e3:8.1f} ({r['step_min_s'] * 1e3:.1f}..{r['step_max_s'] * 1e3:.1f}) | {r['img_per_s']:6.2f} | {mem} | "
            f"{r['tflops_per_s']:7.1f} | {pct(r['mfu'])} {pct(r['hfu'])} | {ratio}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cpu-smoke', '--quick', dest='cpu_smoke', action='store_true', help='tiny UNet on the CPU through every code path (CI)')
    p.add_argument('--resolution', type=int, default=None, help='pixels per side (default 1024; 64 with --cpu-smoke)')
    p.add_argument('--batch', type=int, nargs='+', default=None, help='batch sizes (default 1 2 4 8; 1 2 with --cpu-smoke)')
    p.add_argument('--checkpointing', nargs='+', choices=['off', 'on'], default=['off', 'on'])
    p.add_argument('--attention', nargs='+', choices=['sdpa', 'xformers'], default=['sdpa', 'xformers'])
    p.add_argument('--optimizer', nargs='+', choices=['adamw_fused', 'adamw8bit', 'adafactor'], default=['adamw_fused', 'adamw8bit', 'adafactor'])
    p.add_argument('--ema', nargs='+', choices=['device', 'cpu', 'off'], default=['device', 'cpu'])
    p.add_argument('--memory-format', nargs='+', choices=['contiguous', 'channels_last'], default=['contiguous', 'channels_last'])
    p.add_argument('--compile', action='store_true', help='add a torch.compile variant (compiles for minutes on the real UNet)')
    p.add_argument('--sweep', choices=['oat', 'full'], default='oat')
    p.add_argument('--fixed-batch', type=int, default=None, help='batch of the one-at-a-time rows (default: the largest --batch; the smallest with --cpu-smoke)')
    p.add_argument('--fixed-checkpointing', choices=['off', 'on'], default='on')
    p.add_argument('--steps', type=int, default=None, help='timed steps per variant (default 10; 2 with --cpu-smoke)')
    p.add_argument('--warmup', type=int, default=None, help='untimed steps first (default 3; 1 with --cpu-smoke)')
    p.add_argument('--amp', choices=['bf16', 'none'], default=None,
                   help='autocast dtype (default bf16; none with --cpu-smoke, where bf16 is emulated and 3x slower)')
    p.add_argument('--peak-tflops', type=float, default=None, help='dense bf16 peak of the GPU, TFLOP/s (default: from its name)')
    p.add_argument('--budget-s', type=float, default=480, help='stop starting new variants after this many seconds')
    p.add_argument('--no-flop-check', action='store_true', help='skip the FlopCounterMode cross-check')
    p.add_argument('--json', type=Path, default=None)
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    args.resolution = args.resolution or (64 if smoke else 1024)
    args.batch = args.batch or ([1, 2] if smoke else [1, 2, 4, 8])
    args.steps = args.steps or (2 if smoke else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    args.amp = args.amp or ('none' if smoke else 'bf16')
    if args.resolution % 32: p.error(f'--resolution {args.resolution}: must be a multiple of 32 (latent side divisible by 4)')

    switches = [configure_allocator(True)]      # before anything touches CUDA
    if smoke:
        device = torch.device('cpu'); torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            print('error: no CUDA device. This benchmark measures the real SDXL UNet on a GPU; '
                  'use --cpu-smoke for the CPU smoke run of the harness.', file=sys.stderr)
            return 2
        device = torch.device('cuda', torch.cuda.current_device())
        if not torch.cuda.is_bf16_supported():
            print(f'error: {torch.cuda.get_device_name(device)} has no bf16 support; the benchmark is bf16 (Ampere or newer)', file=sys.stderr)
            return 2
        switches += [set_tf32(True), set_cudnn_benchmark(True)]
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU ({platform.processor() or platform.machine()})'
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (peak_bf16_flops(name) if device.type == 'cuda' else None)
    print(f"device: {name}; peak bf16 {'%.1f TFLOP/s' % (peak / 1e12) if peak else 'unknown (MFU n/a; give --peak-tflops)'}; "
          f"torch {torch.__version__}")
    for s in switches: print(f'  {s}')

    t0 = time.perf_counter()
    unet = build_unet(args, device).train()     # diffusers checkpoints only in training mode
    cfg = dict(unet.config)
    fwd = unet_forward_flops(cfg, args.resolution, args.resolution)
    nparams = sum(p.numel() for p in unet.parameters())
    print(f"UNet: {nparams / 1e9:.3f} B parameters, built in {time.perf_counter() - t0:.1f} s; analytic forward "
          f"{fwd / 1e12:.4f} TFLOP per image at {args.resolution}²")
    from ztsnr_nb.models.sdxl import sdxl_unet_config
    checks = {}
    if not args.no_flop_check:
        checks['this_unet'] = flop_check(cfg, args.resolution)
        if not smoke: checks['sdxl_1024'] = flop_check(sdxl_unet_config(), 1024)   # ~5-8 s of CPU; the notebook checks it too
        for k, c in checks.items():
            print(f"  FLOP check {k}: analytic {c['analytic'] / 1e12:.4f} TFLOP, FlopCounterMode {c['flop_counter'] / 1e12:.4f} "
                  f"({'equal' if c['analytic'] == c['flop_counter'] else 'DIFFERENT'})")
    sdxl_fwd = unet_forward_flops(sdxl_unet_config(), 1024, 1024)
    print(f"  SDXL UNet at 1024², analytic: {sdxl_fwd / 1e12:.3f} TFLOP per forward vs RESEARCH §7 {RESEARCH_TFLOP_1024}")

    todo = variants(args)
    print(f"\n{len(todo)} variants, {args.warmup} warm-up + {args.steps} timed steps each, autocast {args.amp}\n"
          f"  B ckpt     attn   optimizer    ema   format comp | step ms median (min..max) | img/s | peak GB | TFLOP/s |  MFU    HFU  | vs ref")
    rows, t_start = [], time.perf_counter()
    for v in todo:
        if time.perf_counter() - t_start > args.budget_s:
            rows.append(dict(v, status='skipped', reason=f'time budget ({args.budget_s:.0f} s) spent')); print(fmt(rows[-1], None)); continue
        r = run_variant(unet, v, args, device, fwd, peak)
        ref = next((x for x in rows if x['status'] == 'ok' and x['batch'] == r['batch'] and x['checkpointing'] == r['checkpointing']
                    and all(x[k] == REF[k] for k in REF)), None)
        rows.append(r)
        print(fmt(r, ref['img_per_s'] if ref and ref is not r else None), flush=True)
    ok = [r for r in rows if r['status'] == 'ok']
    if ok and peak:
        best = max(ok, key=lambda r: r['mfu'])
        print(f"\nbest MFU {best['mfu']:.1%} (batch {best['batch']}, checkpointing {best['checkpointing']}, {best['optimizer']}, "
              f"EMA {best['ema']}); goal >= 40%")
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({'device': name, 'peak_flops': peak, 'torch': torch.__version__, 'resolution': args.resolution, 'amp': args.amp,
                                         'parameters': nparams, 'forward_flops': fwd, 'sdxl_1024_forward_flops': sdxl_fwd,
                                         'flop_checks': checks,
                                         'switches': [str(s) for s in switches], 'rows': rows}, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
