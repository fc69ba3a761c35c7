#!/usr/bin/env python3
"""Data-pipeline benchmarks (issue 4, item 9): each ratio is measured in one run and printed as a table.

  python bench/bench_data.py            # full run (a few minutes on 2 CPU cores)
  python bench/bench_data.py --quick    # smaller sizes, for a smoke test
  python bench/bench_data.py --json out.json

Metrics (goal in brackets):
  1. LatentCache.get throughput / a bare safetensors read of the same tensors from the same shards, handles already
     open, random order, warm page cache; median over rounds of paired (back-to-back, alternating) timings  [>= 0.8].
     Two modes: owned copies (get() vs get_tensor().clone()) and zero-copy views of the map (get(copy=False) vs
     get_tensor(), which safetensors returns without copying a byte).
  2. data-wait fraction of a tiny training step: time blocked in next(dataloader) / (wait + step), steady state
     (the first batch, which includes starting the worker, is reported separately)  [< 5%]
  3. peak RSS (VmHWM: the process's resident-set high-water mark) of a fresh process iterating a 100,000-entry synthetic cache through the dataset and loader
     (latents 4x8x8 fp16, written directly, no VAE)  [< 1 GiB]
  4. LatentCache.build throughput / a bare loop doing the same work without a cache (load, crop, VAE encode, keep
     mean+std in memory; no hashing, index or writes), same records, buckets, batches and tiny VAE; median of paired
     rounds  [>= 0.9]
Everything runs with torch.set_num_threads(1) (shared machine); models are the tiny SDXL twins from ztsnr_nb.models.sdxl.
"""
from __future__ import annotations

import argparse, json, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

import numpy as np
import torch

from ztsnr_nb.data.buckets import BucketBatchSampler, apply_crop_plan, assign_buckets, crop_plan, make_buckets
from ztsnr_nb.data.dataset import CachedLatentDataset, make_dataloader, prepare_dataset
from ztsnr_nb.data.sources import ImageRecord, load_image_rgb, scan_kohya_folder
from ztsnr_nb.data.latent_cache import LatentCache, TextEmbeddingCache, _ShardWriter
from ztsnr_nb.models.vae import encode_latent_dist, pil_to_pixels
from ztsnr_nb.models.sdxl import build_tiny_sdxl
from ztsnr_nb.data.synthetic import make_synthetic_dataset


def _write_synthetic_latents(cache: LatentCache, n: int, shape, shard_size: int, bucket=(64, 64)) -> list[str]:
    "Fill a LatentCache with n random (mean, std) entries without a VAE (the store's own writer; for benchmarks)."
    cache._begin(f'synthetic-{n}-{shape}', {'buckets': [list(bucket)], 'scaling_factor': 0.13025})
    w = _ShardWriter(cache, rank=0, shard_size=shard_size, flush_every_s=1e9)
    g = torch.Generator().manual_seed(0)
    base_m, base_s = torch.randn(64, *shape, generator=g).half(), torch.rand(64, *shape, generator=g).half()
    tid = json.dumps([bucket[1], bucket[0], 0, 0, bucket[1], bucket[0]])
    keys = []
    for i in range(n):
        k = f'/synthetic/{i:07d}.png'
        w.add({'mean': base_m[i % 64], 'std': base_s[i % 64]},
              dict(key=k, width=bucket[0], height=bucket[1], bucket_w=bucket[0], bucket_h=bucket[1], time_ids=tid,
                   has_flip=0, has_std=1))
        keys.append(k)
    w.flush()
    return keys


def _paired(baseline, candidate, rounds: int):
    "Time both back to back, alternating which goes first; (best baseline s, best candidate s, per-round baseline/candidate)."
    tb, tc, ratios = float('inf'), float('inf'), []
    for k in range(rounds):
        pair = {}
        for name, fn in ((('b', baseline), ('c', candidate)) if k % 2 == 0 else (('c', candidate), ('b', baseline))):
            t = time.perf_counter(); fn(); pair[name] = time.perf_counter() - t
        tb, tc = min(tb, pair['b']), min(tc, pair['c'])
        ratios.append(pair['b'] / pair['c'])   # throughput ratio candidate / baseline
    return tb, tc, ratios


# -- 1. read throughput -------------------------------------------------------------------------------------------
def bench_read(tmp: Path, n: int, shape, shard_size: int, rounds: int = 15) -> dict:
    from safetensors import safe_open
    cache = LatentCache(tmp / f'read_{"x".join(map(str, shape))}')
    keys = _write_synthetic_latents(cache, n, shape, shard_size)
    order = [keys[i] for i in np.random.default_rng(0).permutation(n)]
    loc = {k: v[:2] for k, v in cache._idx().pos.items()}
    handles = {name: safe_open(str(cache._shard_path(name)), 'pt') for name, _ in loc.values()}

    def bare():   # owned copies, like LatentCache.get()
        for k in order:
            name, slot = loc[k]; h = handles[name]
            h.get_tensor(f'{slot}.mean').clone(); h.get_tensor(f'{slot}.std').clone()

    def cached():
        for k in order: cache.get(k)

    def bare_views():   # safetensors' zero-copy views of the map, like LatentCache.get(copy=False)
        for k in order:
            name, slot = loc[k]; h = handles[name]
            h.get_tensor(f'{slot}.mean'); h.get_tensor(f'{slot}.std')

    def cached_views():
        for k in order: cache.get(k, copy=False)

    bare(); cached(); bare_views(); cached_views()  # warm: page cache, handles
    out = dict(n=n, shape=list(shape), mib=2 * n * int(np.prod(shape)) * 2 / 2**20)
    for tag, (b, c) in (('copy', (bare, cached)), ('view', (bare_views, cached_views))):
        tb, tc, ratios = _paired(b, c, rounds)
        out[tag] = dict(bare_items_s=n / tb, cache_items_s=n / tc, ratio=float(np.median(ratios)),
                        ratio_q25=float(np.quantile(ratios, 0.25)), ratio_q75=float(np.quantile(ratios, 0.75)))
    return out


# -- 2. data-wait fraction ----------------------------------------------------------------------------------------
def bench_wait(tmp: Path, tiny, folder: Path, buckets, epochs: int, batch_size: int, num_workers: int) -> dict:
    ds, sampler = prepare_dataset(folder, tiny, tmp / 'wait_cache', buckets=buckets, batch_size=batch_size, progress=False)
    dl = make_dataloader(ds, sampler, num_workers=num_workers, pin_memory=False)
    unet = tiny.unet.train()
    opt = torch.optim.AdamW(unet.parameters(), 1e-4)
    waits, steps, first = [], [], None
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        it = iter(dl)
        while True:
            t0 = time.perf_counter()
            try: b = next(it)
            except StopIteration: break
            t1 = time.perf_counter()
            x0 = b['latents']; noise = torch.randn_like(x0); t = torch.randint(0, 1000, (x0.shape[0],))
            pred = unet(x0 + noise, t, b['prompt_embeds'],
                        added_cond_kwargs=dict(text_embeds=b['pooled_prompt_embeds'], time_ids=b['time_ids'])).sample
            loss = ((pred - noise) ** 2).mean(dim=(1, 2, 3)).mul(b['weight']).mean()
            loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
            t2 = time.perf_counter()
            if first is None: first = t1 - t0; continue  # worker start-up: reported separately
            waits.append(t1 - t0); steps.append(t2 - t1)
    w, s = float(np.sum(waits)), float(np.sum(steps))
    return dict(steps=len(steps), wait_s=w, step_s=s, fraction=w / (w + s), first_batch_s=first,
                mean_step_ms=1000 * s / len(steps), num_workers=num_workers, batch_size=batch_size)


# -- 3. peak RSS over a 100k-entry cache ----------------------------------------------------------------------------
def rss_child(folder: Path, n: int) -> None:
    "Run in a fresh process: iterate the whole cache through dataset + loader, print RSS figures as JSON."
    torch.set_num_threads(1)
    def kib(field):
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith(field + ':'): return int(line.split()[1])
        return 0
    base = kib('VmHWM')  # this process's own high-water mark (ru_maxrss would include the parent's RSS at fork)
    lc, tc = LatentCache(folder / 'latents'), TextEmbeddingCache(folder / 'text')
    recs = [ImageRecord(f'/synthetic/{i:07d}.png', '', 64, 64) for i in range(n)]
    ds = CachedLatentDataset(lc, recs, text_cache=tc, seed=0)
    sampler = BucketBatchSampler(ds.bucket_indices, batch_size=256, seed=0)
    t0, seen = time.perf_counter(), 0
    for b in make_dataloader(ds, sampler, num_workers=0, pin_memory=False):
        seen += len(b['key'])
    dt = time.perf_counter() - t0
    peak = kib('VmHWM')
    print(json.dumps(dict(n=seen, baseline_kib=base, peak_kib=peak, rss_anon_kib=kib('RssAnon'), rss_file_kib=kib('RssFile'),
                          items_s=seen / dt, seconds=dt, cache_mib=lc.disk_bytes() / 2**20)))


def bench_rss(tmp: Path, n: int, tiny) -> dict:
    folder = tmp / 'rss'
    lc = LatentCache(folder / 'latents')
    _write_synthetic_latents(lc, n, (4, 8, 8), shard_size=4096)
    tc = TextEmbeddingCache(folder / 'text')
    tc.build([''], tiny.text_encoder, tiny.text_encoder_2, tiny.tokenizer, tiny.tokenizer_2, progress=False)
    del lc, tc
    r = subprocess.run([sys.executable, __file__, '--rss-child', str(folder), '--n', str(n)], capture_output=True, text=True,
                       timeout=3600)
    if r.returncode != 0: raise RuntimeError(f'RSS child failed:\n{r.stderr[-3000:]}')
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- 4. caching throughput vs a bare encode loop --------------------------------------------------------------------
def bare_encode_loop(records, vae, buckets, batch_size: int) -> int:
    "What one would write without a cache: per bucket batch load, crop, encode, keep mean/std (fp16) in memory."
    idx = assign_buckets([r.width for r in records], [r.height for r in records], buckets)
    groups: dict[int, list] = {}
    for r, b in zip(records, idx): groups.setdefault(int(b), []).append(r)
    kept = []
    for b, rs in sorted(groups.items()):
        for i in range(0, len(rs), batch_size):
            px = []
            for r in rs[i:i + batch_size]:
                img = load_image_rgb(r.path)
                px.append(pil_to_pixels(apply_crop_plan(img, crop_plan(r.width, r.height, buckets[b]))))
            mean, std = encode_latent_dist(vae, torch.stack(px))
            kept += list(zip(mean.half(), std.half()))
    return len(kept)


def bench_build(tmp: Path, records, vae, buckets, batch_size: int, rounds: int) -> dict:
    bare_encode_loop(records[:batch_size], vae, buckets, batch_size)  # warm-up
    runs = iter(range(10**6))
    def bare(): assert bare_encode_loop(records, vae, buckets, batch_size) == len(records)
    def cached():
        d = tmp / f'build_{next(runs)}'
        rep = LatentCache(d).build(records, vae, buckets, batch_size=batch_size, progress=False)
        assert rep.encoded == len(records), rep
        shutil.rmtree(d)
    tb, tc, ratios = _paired(bare, cached, rounds)
    return dict(n=len(records), bare_items_s=len(records) / tb, cache_items_s=len(records) / tc, ratio=float(np.median(ratios)),
                ratio_q25=float(np.quantile(ratios, 0.25)), ratio_q75=float(np.quantile(ratios, 0.75)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--quick', action='store_true', help='smaller sizes (smoke test)')
    ap.add_argument('--json', help='also write the results here')
    ap.add_argument('--rss-child', help=argparse.SUPPRESS)
    ap.add_argument('--n', type=int, default=100_000, help='entries in the RSS benchmark cache (default 100000)')
    a = ap.parse_args(argv)
    if a.rss_child: rss_child(Path(a.rss_child), a.n); return 0
    torch.set_num_threads(1)
    q = a.quick
    tmp = Path(tempfile.mkdtemp(prefix='bench_data_'))
    try:
        tiny = build_tiny_sdxl(seed=0)
        res = {}
        t0 = time.perf_counter()
        res['read_sdxl'] = bench_read(tmp, 64 if q else 256, (4, 128, 128), shard_size=64)
        res['read_small'] = bench_read(tmp, 512 if q else 4096, (4, 32, 32), shard_size=1024)
        folder = tmp / 'images'
        make_synthetic_dataset(folder, n=16 if q else 48, seed=0, min_side=192, max_side=320)
        records, _ = scan_kohya_folder(folder)
        buckets = make_buckets(max_area=256 * 256, step=64, min_side=128, max_side=512)
        res['build'] = bench_build(tmp, records, tiny.vae, buckets, batch_size=8, rounds=2 if q else 5)
        res['wait'] = bench_wait(tmp, tiny, folder, buckets, epochs=2, batch_size=4, num_workers=1)
        res['rss'] = bench_rss(tmp, 10_000 if q else a.n, tiny)
        res['seconds'] = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rs, rw, rb, rr = res['read_sdxl'], res['wait'], res['build'], res['rss']
    peak_mib = rr['peak_kib'] / 1024
    rows = []
    for r in (rs, res['read_small']):
        for tag, what in (('copy', 'copies: get() vs get_tensor().clone()'), ('view', 'views: get(copy=False) vs get_tensor()')):
            m = r[tag]
            rows.append((f"cache read / bare read, {r['n']} x 2 x {'x'.join(map(str, r['shape']))} fp16, {what}", f"{m['ratio']:.2f}",
                         '>= 0.8', m['ratio'] >= 0.8,
                         f"IQR {m['ratio_q25']:.2f}-{m['ratio_q75']:.2f}; best {m['cache_items_s']:.0f} vs {m['bare_items_s']:.0f} items/s"))
    rows += [
        (f"data-wait fraction, tiny training step (batch {rw['batch_size']}, {rw['num_workers']} worker)", f"{100 * rw['fraction']:.2f}%",
         '< 5%', rw['fraction'] < 0.05, f"{rw['steps']} steps, {rw['mean_step_ms']:.0f} ms/step, first batch {rw['first_batch_s']:.2f} s"),
        (f"peak RSS iterating a {rr['n']:,}-entry cache", f"{peak_mib:.0f} MiB", '< 1024 MiB', peak_mib < 1024,
         f"after imports {rr['baseline_kib'] / 1024:.0f} MiB; cache {rr['cache_mib']:.0f} MiB on disk; {rr['items_s']:.0f} items/s"),
        (f"caching / bare VAE encode loop, {rb['n']} images", f"{rb['ratio']:.2f}", '>= 0.9', rb['ratio'] >= 0.9,
         f"IQR {rb['ratio_q25']:.2f}-{rb['ratio_q75']:.2f}; best {rb['cache_items_s']:.1f} vs {rb['bare_items_s']:.1f} images/s"),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"\n{'metric':{w}}  {'value':>10}  {'goal':>11}  ok   detail")
    for name, val, goal, ok, detail in rows:
        print(f"{name:{w}}  {val:>10}  {goal:>11}  {'yes' if ok else 'NO ':3}  {detail}")
    print(f"\n(total {res['seconds']:.0f} s; torch threads 1; {os.cpu_count()} CPUs visible)")
    if a.json: Path(a.json).write_text(json.dumps(res, indent=1))
    return 0 if all(r[3] for r in rows) else 1


if __name__ == '__main__':
    sys.exit(main())
