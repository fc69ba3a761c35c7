"""Benchmark: txt2img time per image, ztsnr_nb's SDXLGenerator vs diffusers' StableDiffusionXLPipeline (goal: ratio <= 1.05).

Both run the same tiny SDXL-architecture model (ztsnr_nb.models.sdxl.build_tiny_sdxl), the same prompt, size, steps, CFG 5 with
rescale 0.7, and the same sampler: Euler on the v-prediction + ZTSNR schedule with trailing spacing (diffusers:
EulerDiscreteScheduler(prediction_type='v_prediction', rescale_betas_zero_snr=True, timestep_spacing='trailing');
ours: SamplerConfig defaults, terminal sigma 4096 = diffusers' clamp). Both decode to PIL images, progress bars off.
Runs alternate (ours, diffusers, diffusers, ours, ...) after one warm-up each, so drift hits both alike.
Reported: median seconds per image, spread (min..max), and the ratio ours/diffusers of medians with the spread of
the per-round ratios. The tiny model makes this a measure of pipeline overhead around the UNet (prompt encoding,
sigma->t interpolation, CFG rescale, VAE guard), which is where the two can differ.
Usage: python bench/bench_inference.py [--steps 28] [--size 256] [--batch 1] [--rounds 6] [--device cpu|cuda] [--threads N]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ztsnr_nb.inference.generate import SDXLGenerator  # noqa: E402
from ztsnr_nb.models.sdxl import build_tiny_sdxl  # noqa: E402

GOAL = 1.05


def _sync(device):
    if device.startswith('cuda'): torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--steps', type=int, default=28)
    ap.add_argument('--size', type=int, default=256, help='image side in pixels (latent side = size/8)')
    ap.add_argument('--batch', type=int, default=1, help='images per call')
    ap.add_argument('--rounds', type=int, default=6)
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s)')
    a = ap.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tiny = build_tiny_sdxl(seed=0)
    for m in (tiny.unet, tiny.vae, tiny.text_encoder, tiny.text_encoder_2): m.to(a.device).eval()
    sched = EulerDiscreteScheduler(beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012,
                                   prediction_type='v_prediction', rescale_betas_zero_snr=True, timestep_spacing='trailing')
    pipe = tiny.replace(scheduler=sched).pipeline()
    pipe.set_progress_bar_config(disable=True)
    gen = SDXLGenerator.from_components(tiny)
    prompt = ['red_circle, blue_background, monochrome'] * a.batch
    S = a.size

    def ours(seed):
        return gen.txt2img(prompt, width=S, height=S, seed=seed, steps=a.steps, progress=False)

    def theirs(seed):
        g = torch.Generator('cpu').manual_seed(seed)
        return pipe(prompt, height=S, width=S, num_inference_steps=a.steps, guidance_scale=5.0, guidance_rescale=0.7,
                    generator=g, output_type='pil').images

    def timed(fn, seed):
        _sync(a.device); t0 = time.perf_counter()
        with torch.inference_mode(): imgs = fn(seed)
        _sync(a.device)
        assert len(imgs) == a.batch
        return (time.perf_counter() - t0) / a.batch

    timed(ours, 0); timed(theirs, 0)                                      # warm-up
    t_ours, t_diff = [], []
    for r in range(a.rounds):
        order = [(ours, t_ours), (theirs, t_diff)]
        if r % 2: order.reverse()
        for fn, acc in order: acc.append(timed(fn, r + 1))
    ratios = [o / d for o, d in zip(t_ours, t_diff)]
    med_o, med_d = statistics.median(t_ours), statistics.median(t_diff)
    ratio = med_o / med_d
    dev = torch.cuda.get_device_name() if a.device.startswith('cuda') else f'cpu ({torch.get_num_threads()} threads)'
    print(f"txt2img, tiny SDXL, {S}x{S}, {a.steps} Euler steps, CFG 5 + rescale 0.7, batch {a.batch}, {a.rounds} rounds, {dev}")
    print(f"{'pipeline':<26}{'median s/img':>14}{'min':>10}{'max':>10}")
    for name, t in (('ztsnr_nb SDXLGenerator', t_ours), ('diffusers SDXL pipeline', t_diff)):
        print(f"{name:<26}{statistics.median(t):>14.4f}{min(t):>10.4f}{max(t):>10.4f}")
    print(f"ratio ours/diffusers: {ratio:.3f} (per-round {min(ratios):.3f}..{max(ratios):.3f}); goal <= {GOAL}: "
          f"{'met' if ratio <= GOAL else 'NOT met'}")
    return 0 if ratio <= GOAL else 1


if __name__ == '__main__':
    sys.exit(main())
