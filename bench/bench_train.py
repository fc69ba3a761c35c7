#!/usr/bin/env python3
"""Benchmark (issue 6, item 10): one full ztsnr_nb training step vs a bare diffusers UNet forward/backward/AdamW step.

  python bench/bench_train.py                 # defaults: 5 rounds x 4 interleaved steps, 2 threads (~2 min when the
                                              # 2-core machine is quiet; --budget caps the rounds when it is not)
  python bench/bench_train.py --quick         # tiny smoke run (seconds)
  python bench/bench_train.py --profile 3     # also torch.profiler table of 3 of our steps
  python bench/bench_train.py --json out.json

Model: the tiny SDXL-architecture UNet of ztsnr_nb.models.sdxl scaled to ~40M parameters: block_out_channels (64,128,256),
layers_per_block 2, transformer_layers_per_block (1,2,3), heads (2,4,8) (head dim 32); SDPA attention in both.
Batch 4 of 32x32 cached latents (random_latent_data: seeded latents + real tiny-text-encoder conditioning).

Variants, measured alternately step by step (each timed step runs one step of every variant, the order rotating, so
drift and the neighbours' load hit all alike):
  ours         Trainer(cfg, models, data)._setup(), then Trainer.optimizer_step(batches, params) -- the code path of fit():
               next batch from the InMemoryData DataLoader, caption dropout (default 0.05), step generator,
               diffusion_loss (t ~ U, eps, x_t, v target, MinSNR-5 weight with terminal_weight='one', per-sample weight),
               non-finite guards, accelerate backward, clip_grad_norm_(1.0), AdamW(foreach=True) via accelerate,
               lr scheduler, EMA update (interval 1, fp32 shadow), zero_grad, loss.item(); mixed_precision 'no'.
  bare         deepcopy of the same UNet (copied before any training), the same batches (epoch-0 plan of the same
               sampler, pre-collated) and conditioning; per step: t ~ randint, noise ~ randn, DDPMScheduler
               (scaled_linear, v_prediction, rescale_betas_zero_snr).add_noise / get_velocity, UNet forward,
               F.mse_loss, backward, clip_grad_norm_(1.0), AdamW.step, zero_grad(set_to_none), loss.item().
               AdamW with the same lr/betas/eps/weight_decay, twice: torch's CPU default (foreach=None -> for-loop
               kernels) and foreach=True (what ours uses).
  ours+fused   (proposal, --no-proposed skips it) ours with make_optimizer swapped, for _setup() only, for
               torch.optim.AdamW(..., fused=True) -- same hyper-parameters; measures the recommended trainer change.
A round is --steps such interleaved steps; the per-round ratio is median(ours)/median(bare). Reported: per-step
median/mean/min..max wall time over all rounds, per-round ratios and their median with spread (min..max); the same
ratios on process CPU time (less sensitive to being descheduled by neighbours, but counts OpenMP spin-waiting).
Overhead breakdown (separate passes, not in the ratio): per-phase wall time of ours and bare (timing wrappers on the
instances), the EMA update in isolation (and its parts), the loss weighting in isolation, the non-model part of
diffusion_loss vs diffusers' add_noise/get_velocity/mse, diffusers' EMAModel.step for reference, accelerate glue,
and fit()'s per-step bookkeeping outside optimizer_step. --profile N adds a torch.profiler op table of N of our steps.
The machine is shared: numbers carry the neighbours' load; compare ratios, not absolute times.
"""
from __future__ import annotations

import argparse, copy, gc, json, statistics, sys, tempfile, time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ztsnr_nb.training.loss import diffusion_loss  # noqa: E402
from ztsnr_nb.training.ema import EMA  # noqa: E402
from ztsnr_nb.training.config import (CheckpointConfig, DataConfig, EMAConfig, LogConfig, LossConfig, OptimConfig,  # noqa: E402
                                      TrainConfig)
from ztsnr_nb.models.sdxl import TinySDXLConfig, build_tiny_sdxl  # noqa: E402
from ztsnr_nb.data.dataset import random_latent_data  # noqa: E402
from ztsnr_nb.training.trainer import Trainer, step_generator  # noqa: E402

GOAL = 1.05
UNET_40M = TinySDXLConfig(block_out_channels=(64, 128, 256), layers_per_block=2, transformer_layers_per_block=(1, 2, 3),
                          attention_head_dim=(2, 4, 8))


def med(xs): return statistics.median(xs)
def mean(xs): return statistics.fmean(xs)


# -- the two steps -------------------------------------------------------------------------------------------------
def fused_adamw(param_groups, c: OptimConfig):
    "The proposed make_optimizer for 'adamw': torch's fused AdamW kernel (CPU and CUDA), same hyper-parameters."
    return torch.optim.AdamW(param_groups, lr=c.lr, betas=(c.beta1, c.beta2), eps=c.eps, weight_decay=c.weight_decay, fused=True)


def make_ours(models, data, out_dir, batch_size, make_optimizer=None):
    """A Trainer set up exactly as fit() would; returns (trainer, step function). `make_optimizer` (bench only) stands in
    for ztsnr_nb.training.trainer.make_optimizer during _setup(), to measure a proposed change without editing the module."""
    cfg = TrainConfig(data=DataConfig(batch_size=batch_size),
                      optim=OptimConfig(optimizer='adamw', mixed_precision='no', max_steps=10 ** 9),
                      loss=LossConfig(weighting='min_snr', gamma=5.0, terminal_weight='one'),
                      ema=EMAConfig(enabled=True, interval=1),
                      checkpoint=CheckpointConfig(output_dir=str(out_dir), every=0, export=False),
                      logging=LogConfig(log_with='none', progress=False))
    tr = Trainer(cfg, models=models, data=data)
    import ztsnr_nb.training.trainer as trainer_mod
    orig = trainer_mod.make_optimizer
    if make_optimizer is not None: trainer_mod.make_optimizer = make_optimizer
    try: tr._setup()
    finally: trainer_mod.make_optimizer = orig
    params = [p for g in tr.opt.param_groups for p in g['params']]
    batches = tr.batches()

    def step():
        ok, loss = tr.optimizer_step(batches, params)
        tr.state.step += 1   # as fit() does after each optimizer_step
        return loss
    return tr, step


class Bare:
    "The bare diffusers loop: DDPMScheduler noise + v target, UNet, MSE, backward, clip, AdamW, zero_grad."
    def __init__(self, unet, batches, o: OptimConfig, foreach, seed=0):
        from diffusers import DDPMScheduler
        self.unet, self.batches, self.i = unet.train(), batches, 0
        self.sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear', num_train_timesteps=1000,
                                   prediction_type='v_prediction', rescale_betas_zero_snr=True)
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
                                     foreach=foreach)
        self.max_grad_norm = o.max_grad_norm
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self):
        b = self.batches[self.i % len(self.batches)]; self.i += 1
        x0, ctx, pooled, tid = b['latents'], b['prompt_embeds'], b['pooled_prompt_embeds'], b['time_ids']
        t = torch.randint(0, self.sched.config.num_train_timesteps, (x0.shape[0],), generator=self.gen)
        noise = torch.randn(x0.shape, generator=self.gen)
        x_t = self.sched.add_noise(x0, noise, t)
        target = self.sched.get_velocity(x0, noise, t)
        pred = self.unet(x_t, t, encoder_hidden_states=ctx, added_cond_kwargs={'text_embeds': pooled, 'time_ids': tid}).sample
        loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


# -- timing --------------------------------------------------------------------------------------------------------
def time_block(fn, k):
    out = []
    for _ in range(k):
        t0 = time.perf_counter(); fn(); out.append(time.perf_counter() - t0)
    return out


def alternate(variants: dict, rounds: int, steps: int, budget_s: float = float('inf'), min_rounds: int = 2):
    """rounds x steps x (one step of each variant, order rotated every step): finest-grained alternation, so the
    neighbours' load hits every variant alike. Returns ({name: [[wall s per step] per round]}, same for CPU s)."""
    names = list(variants)
    wall, cpu = ({n: [] for n in names} for _ in range(2))
    i, t_end = 0, time.perf_counter() + budget_s
    for r in range(rounds):
        if r >= min_rounds and time.perf_counter() > t_end:
            print(f'  time budget ({budget_s:.0f} s) spent: stopping after {r} rounds'); break
        for n in names: wall[n].append([]); cpu[n].append([])
        gc.collect()
        for j in range(steps):
            if j and r >= min_rounds and time.perf_counter() > t_end: break   # keep what this round has
            order = names[i % len(names):] + names[:i % len(names)]; i += 1
            for n in order:
                c0, t0 = time.process_time(), time.perf_counter()
                variants[n]()
                wall[n][-1].append(time.perf_counter() - t0); cpu[n][-1].append(time.process_time() - c0)
        line = '  '.join(f'{n} {med(wall[n][-1]) * 1e3:7.1f}' for n in names)
        print(f'  round {r + 1}/{rounds} ({time.perf_counter() - t_end + budget_s:4.0f} s) median wall ms/step: {line}   ours/bare(foreach=None) '
              f'{med(wall[names[0]][-1]) / med(wall[names[1]][-1]):.3f}', flush=True)
    return wall, cpu


class PhaseTimer:
    "Accumulates wall time of wrapped callables per phase name (reset per step)."
    def __init__(self): self.t = defaultdict(float)

    def wrap(self, name, fn):
        def w(*a, **k):
            t0 = time.perf_counter()
            try: return fn(*a, **k)
            finally: self.t[name] += time.perf_counter() - t0
        return w


REST = 'rest (loss math, RNG, item, glue)'


def phase_breakdown(tr, bare: Bare, k: int):
    """Per-phase wall seconds per step of ours and of `bare`, steps interleaved (ours, bare, ours, ...), median per phase
    over the k steps. Timing wrappers go on the trainer's own objects and the bare loop's, and are removed after."""
    po, pb = PhaseTimer(), PhaseTimer()
    acc, ours_unet = tr.acc, tr.unet
    targets = [(acc, 'backward', po, 'backward'), (acc, 'clip_grad_norm_', po, 'clip_grad_norm'), (tr.opt, 'step', po, 'optimizer.step'),
               (tr.opt, 'zero_grad', po, 'zero_grad'), (tr.lr_sched, 'step', po, 'lr scheduler'), (tr.ema, 'update', po, 'EMA update'),
               (ours_unet, 'forward', po, 'UNet forward'), (tr, 'conditioning', po, 'conditioning (+caption dropout)'),
               (tr, '_all_finite', po, 'non-finite guards'),
               (bare.unet, 'forward', pb, 'UNet forward'), (bare.opt, 'step', pb, 'optimizer.step'), (bare.opt, 'zero_grad', pb, 'zero_grad')]
    saved = [(o, a, a in o.__dict__, o.__dict__.get(a)) for o, a, _, _ in targets]
    for o, a, timer, name in targets: setattr(o, a, timer.wrap(name, getattr(o, a)))
    clip, tb = torch.nn.utils.clip_grad_norm_, torch.Tensor.backward   # the bare loop calls these module-level
    params = [p for g in tr.opt.param_groups for p in g['params']]
    src = tr.batches()
    def timed_batches():
        while True:
            t0 = time.perf_counter(); b = next(src); po.t['next batch (DataLoader)'] += time.perf_counter() - t0
            yield b
    batches = timed_batches()
    rows_o, rows_b = [], []
    try:
        for _ in range(k):
            po.t.clear(); t0 = time.perf_counter()
            tr.optimizer_step(batches, params); tr.state.step += 1
            rows_o.append({**po.t, 'TOTAL': time.perf_counter() - t0})
            torch.nn.utils.clip_grad_norm_ = pb.wrap('clip_grad_norm', clip); torch.Tensor.backward = pb.wrap('backward', tb)
            try:
                pb.t.clear(); t0 = time.perf_counter(); bare()
                rows_b.append({**pb.t, 'TOTAL': time.perf_counter() - t0})
            finally: torch.nn.utils.clip_grad_norm_, torch.Tensor.backward = clip, tb
    finally:
        for o, a, had, v in saved:
            if had: o.__dict__[a] = v
            else: o.__dict__.pop(a, None)
    def summarize(rows):
        for r in rows: r[REST] = r['TOTAL'] - sum(v for n, v in r.items() if n != 'TOTAL')
        keys = list(dict.fromkeys(n for r in rows for n in r))
        return {n: med([r.get(n, 0.0) for r in rows]) for n in keys}
    return summarize(rows_o), summarize(rows_b)


def micro(fn, n, repeat=5):
    "Median over `repeat` of the mean seconds per call of `fn` over n calls."
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n): fn()
        out.append((time.perf_counter() - t0) / n)
    return med(out)


def overhead_parts(tr, bare: Bare, batch, n_ema):
    "EMA update and its parts, loss weighting, non-model loss math, fit() bookkeeping; seconds per call."
    base = tr.acc.unwrap_model(tr.unet)
    ema = EMA(base, max_decay=tr.cfg.ema.max_decay, power=tr.cfg.ema.power, interval=1)   # a private copy
    cur = [p.detach() for p in ema._params(base)]
    step = [1000]
    def ema_update(): ema.update(base, step[0]); step[0] += 1
    res = {'EMA.update (whole)': micro(ema_update, n_ema),
           'EMA: _params (dict(named_parameters) lookup)': micro(lambda: ema._params(base), 50),
           'EMA: _foreach_lerp_ only': micro(lambda: torch._foreach_lerp_(ema.shadow, cur, 1e-3), n_ema)}
    res['EMA: per-param .detach().to(device, fp32) list'] = micro(lambda: [p.detach().to(s.device, torch.float32)
                                                                          for p, s in zip(cur, ema.shadow)], 50)
    del ema, cur; gc.collect()
    # reference: diffusers' own EMAModel (what train_text_to_image_sdxl.py --use_ema would add), both modes
    from diffusers.training_utils import EMAModel
    for fe in (False, True):
        dema = EMAModel(base.parameters(), decay=0.9999, use_ema_warmup=True, power=2 / 3, foreach=fe)
        res[f'reference: diffusers EMAModel.step (foreach={fe})'] = micro(lambda: dema.step(base.parameters()), n_ema)
        del dema; gc.collect()
    cfg, sched = tr.cfg.loss, tr.schedule
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (batch['latents'].shape[0],), generator=g)
    sw = batch['weight']
    tw = lambda: sched.loss_weight(t, cfg.weighting, 'v', cfg.gamma, cfg.terminal_weight)   # noqa: E731
    res['loss weighting: NoiseSchedule.loss_weight (MinSNR, terminal)'] = micro(tw, 500)
    ps = torch.rand(t.shape[0])
    res['loss weighting: w_t x sample weight x mse, mean - plain mean'] = \
        micro(lambda: (tw() * sw * ps).mean(), 500) - micro(lambda: ps.mean(), 500)
    x0 = batch['latents']
    stub = lambda x_t, tt: x_t   # noqa: E731  (model cost ~0: what remains is the loss's own math)
    res['diffusion_loss minus model (ours)'] = micro(lambda: diffusion_loss(stub, x0, sched, cfg, sample_weight=sw, generator=g), 300)
    def bare_loss():
        tt = torch.randint(0, 1000, (x0.shape[0],), generator=g); nz = torch.randn(x0.shape, generator=g)
        xt = bare.sched.add_noise(x0, nz, tt); v = bare.sched.get_velocity(x0, nz, tt)
        return F.mse_loss(stub(xt, tt).float(), v.float())
    res['add_noise+get_velocity+mse minus model (bare)'] = micro(bare_loss, 300)
    res['step_generator'] = micro(lambda: step_generator(0, 0, 123), 1000)
    acc = tr.acc
    def autocast_enter_exit():
        with acc.autocast(): pass
    one = torch.tensor(0.5)
    res['accelerate glue: unwrap_model + autocast() + reduce(loss).item()'] = micro(
        lambda: (acc.unwrap_model(tr.unet), autocast_enter_exit(), acc.reduce(torch.stack([one]).mean(), 'mean').item()), 500)
    # fit() per-step bookkeeping outside optimizer_step (not in the ratio): metrics.jsonl line + stop-signal check
    res['fit(): _log_step + _stop_requested (outside optimizer_step)'] = micro(lambda: (tr._log_step(0.1, 1.0), tr._stop_requested()), 200)
    return res


# -- main ----------------------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--rounds', type=int, default=5)
    ap.add_argument('--steps', type=int, default=4, help='timed steps per variant per round')
    ap.add_argument('--warmup', type=int, default=2, help='untimed steps per variant first')
    ap.add_argument('--budget', type=float, default=180, help='seconds for the alternating rounds; later rounds are dropped '
                    'once it is spent (at least 2 rounds run): keeps a run on a loaded machine near 5 minutes')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--batch', type=int, default=4)
    ap.add_argument('--size', type=int, default=32, help='latent side')
    ap.add_argument('--phase-steps', type=int, default=5, help='steps per variant for the per-phase breakdown (0 = skip)')
    ap.add_argument('--profile', type=int, default=0, help='torch.profiler over this many of our steps (0 = off)')
    ap.add_argument('--no-proposed', dest='proposed', action='store_false',
                    help="skip the 'ours+fused AdamW' variant (the proposed make_optimizer change)")
    ap.add_argument('--quick', action='store_true', help='smoke test: default tiny UNet, 2 rounds x 2 steps')
    ap.add_argument('--json', default=None)
    a = ap.parse_args(argv)
    if a.quick: a.rounds, a.steps, a.warmup, a.phase_steps = 2, 2, 1, 1
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()

    tiny = build_tiny_sdxl(seed=0, config=TinySDXLConfig() if a.quick else UNET_40M)
    models = tiny
    n_params = sum(p.numel() for p in models.unet.parameters())
    bare_unet_a = copy.deepcopy(models.unet); bare_unet_b = copy.deepcopy(models.unet)   # before any training
    fused_models = models.replace(unet=copy.deepcopy(models.unet)) if a.proposed else None
    data = random_latent_data(models, n=8 * a.batch, size=a.size, batch_size=a.batch, seed=0)
    bare_batches = [data._collate(list(map(int, idx))) for idx in data.sampler.epoch_plan(0)]   # same batches, epoch 0
    with tempfile.TemporaryDirectory(prefix='bench_train_') as out_dir:
        tr, ours = make_ours(models, data, Path(out_dir) / 'ours', a.batch)
        if a.proposed:
            data_f = random_latent_data(fused_models, n=8 * a.batch, size=a.size, batch_size=a.batch, seed=0)
            _, ours_fused = make_ours(fused_models, data_f, Path(out_dir) / 'ours_fused', a.batch, make_optimizer=fused_adamw)
        torch.set_num_threads(a.threads)   # in case anything above changed it
        o = tr.cfg.optim
        bare_default = Bare(bare_unet_a, bare_batches, o, foreach=None)
        bare_foreach = Bare(bare_unet_b, bare_batches, o, foreach=True)
        inner = tr.opt.optimizer if hasattr(tr.opt, 'optimizer') else tr.opt
        print(f'UNet {n_params / 1e6:.2f}M parameters, batch {a.batch} x 4x{a.size}x{a.size} latents, '
              f'{torch.get_num_threads()} threads, torch {torch.__version__}')
        print(f'ours: AdamW fused={inner.defaults.get("fused")} foreach={inner.defaults.get("foreach")}, lr {o.lr}, wd {o.weight_decay}, clip {o.max_grad_norm}, '
              f'EMA interval {tr.cfg.ema.interval}, loss {tr.cfg.loss.weighting} terminal_weight={tr.cfg.loss.terminal_weight!r}, '
              f'caption_dropout {tr.cfg.data.caption_dropout}, mixed_precision {o.mixed_precision}')
        variants = {'ours': ours, 'bare(foreach=None)': bare_default, 'bare(foreach=True)': bare_foreach}
        if a.proposed: variants['ours+fused AdamW'] = ours_fused
        for n, fn in variants.items():
            for _ in range(a.warmup): fn()
        print(f'warm-up done ({time.perf_counter() - t_start:.0f} s); {a.rounds} rounds x {a.steps} steps per variant:')
        res, res_cpu = alternate(variants, a.rounds, a.steps, a.budget)

        # table
        print(f'\n{"variant":<20} {"median ms":>10} {"mean ms":>10} {"min..max ms":>17} {"CPU-time median ms":>19}')
        for n in variants:
            xs, cs = [x for r in res[n] for x in r], [x for r in res_cpu[n] for x in r]
            print(f'{n:<20} {med(xs) * 1e3:10.1f} {mean(xs) * 1e3:10.1f} {min(xs) * 1e3:8.1f}..{max(xs) * 1e3:<8.1f} '
                  f'{med(cs) * 1e3:19.1f}')
        summary = {'n_params': n_params, 'threads': torch.get_num_threads(), 'rounds': a.rounds, 'steps': a.steps,
                   'wall': res, 'cpu': res_cpu, 'ratios': {}, 'cpu_ratios': {}}
        print()
        pairs = [('ours', 'bare(foreach=None)'), ('ours', 'bare(foreach=True)')]
        if a.proposed: pairs += [('ours+fused AdamW', 'bare(foreach=None)'), ('ours+fused AdamW', 'ours')]
        for us, b in pairs:
            rs = [med(o_) / med(b_) for o_, b_ in zip(res[us], res[b])]
            cr = [med(o_) / med(b_) for o_, b_ in zip(res_cpu[us], res_cpu[b])]
            summary['ratios'][f'{us} / {b}'], summary['cpu_ratios'][f'{us} / {b}'] = rs, cr
            ok = ('meets' if med(rs) <= GOAL else 'MISSES') + f' goal <= {GOAL}' if us == 'ours' else '(proposed change)'
            print(f'{us + " / " + b:<40} wall: median {med(rs):.3f}  spread {min(rs):.3f}..{max(rs):.3f}  '
                  f'per round [{", ".join(f"{r:.3f}" for r in rs)}]  -> {ok}')
            print(f'{"":<41}CPU:  median {med(cr):.3f}  spread {min(cr):.3f}..{max(cr):.3f}')
            mr = [min(o_) / min(b_) for o_, b_ in zip(res[us], res[b])]
            allmin = min(x for r in res[us] for x in r) / min(x for r in res[b] for x in r)
            summary.setdefault('min_ratios', {})[f'{us} / {b}'] = mr
            print(f'{"":<41}best-of (min wall per round): median {med(mr):.3f}  spread {min(mr):.3f}..{max(mr):.3f}; '
                  f'overall min/min {allmin:.3f}')

        if a.phase_steps:
            print(f'\nper-phase breakdown, ms/step (median of {a.phase_steps} interleaved steps each, separate pass, timing wrappers on):')
            po, pb = phase_breakdown(tr, bare_foreach, a.phase_steps)
            keys = [k for k in dict.fromkeys([*po, *pb]) if k not in ('TOTAL', REST)] + [REST, 'TOTAL']
            print(f'{"phase":<36} {"ours":>9} {"bare(foreach=True)":>19} {"diff":>9}')
            for k in keys:
                x, y = po.get(k, 0.0) * 1e3, pb.get(k, 0.0) * 1e3
                print(f'{k:<36} {x:9.1f} {y:19.1f} {x - y:+9.1f}')
            print('(TOTAL and rest are medians of per-step values, so the column need not add up exactly)')
            summary['phases'] = {'ours': po, 'bare(foreach=True)': pb}

        parts = overhead_parts(tr, bare_foreach, bare_batches[0], n_ema=3 if a.quick else 8)
        print('\noverhead parts in isolation (ms per call):')
        ours_med = med([x for r in res['ours'] for x in r])
        for k, v in parts.items():
            print(f'  {k:<66} {v * 1e3:9.3f} ms  ({100 * v / ours_med:5.2f}% of our median step)')
        summary['parts'] = parts

        if a.profile:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(a.profile): ours()
            print(f'\ntorch.profiler, {a.profile} of our steps, top ops by self CPU time:')
            print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=25))

    print(f'\ntotal wall time {time.perf_counter() - t_start:.0f} s')
    if a.json: Path(a.json).write_text(json.dumps(summary, indent=1, default=str))
    return summary


if __name__ == '__main__':
    main()
