"""Benchmark: 'scan' + bucket assignment + sampler epoch for N synthetic metadata records (goal: 1,000,000 in < 60 s).

Stages (each timed on its own; the total is compared with the 60 s goal):
  records    build N ImageRecord objects from a saved-scan JSONL (`ztsnr_nb.data.sources.load_records`), i.e. the
             metadata-only scan a trainer does on every start (the header scan itself is a one-off, see 21_data_sources);
  assign     nearest-aspect bucket of every record (`bucket_records`, vectorised; SDXL 33 buckets);
  sampler    BucketBatchSampler construction + a full epoch of batches (batch 4, and rank 0 of 8 for DDP);
  resume     load_state_dict at the middle of the epoch + first batch.
Usage: python bench/bench_scan.py [--n 1000000] [--batch-size 4]
"""
import argparse, os, sys, tempfile, time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ztsnr_nb.data.buckets import BucketBatchSampler, bucket_histogram, bucket_records, make_buckets  # noqa: E402
from ztsnr_nb.data.sources import ImageRecord, load_records, save_records  # noqa: E402

GOAL_S = 60.0


def synthetic_sizes(n, seed=0):
    "Image sizes like a booru crawl: log-normal area around 1.5 Mpx, aspects mostly portrait, some extreme."
    rng = np.random.default_rng(seed)
    area = np.exp(rng.normal(np.log(1.5e6), 0.6, n))
    aspect = np.exp(rng.normal(np.log(0.75), 0.35, n))  # w/h
    w = np.clip(np.sqrt(area * aspect), 64, 8192).round().astype(np.int64)
    h = np.clip(np.sqrt(area / aspect), 64, 8192).round().astype(np.int64)
    return w, h


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--n', type=int, default=1_000_000)
    ap.add_argument('--batch-size', type=int, default=4)
    ap.add_argument('--files', type=int, default=300, help='real files for the header-scan rate (0: skip)')
    a = ap.parse_args(argv)
    rows = []
    def timed(name, fn):
        t = time.perf_counter(); out = fn(); rows.append((name, time.perf_counter() - t)); return out

    w, h = synthetic_sizes(a.n)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / 'records.jsonl'
        t = time.perf_counter()
        save_records((ImageRecord(f'/data/img/{i:07d}.png', 'tag_a, tag_b, tag_c', int(w[i]), int(h[i]))
                      for i in range(a.n)), path)
        setup = time.perf_counter() - t
        recs = timed('records: load_records (JSONL -> ImageRecord)', lambda: load_records(path))
    buckets = make_buckets(max_area=1024 * 1024, step=64, min_side=512, max_side=2048)
    asg = timed('assign: bucket_records (33 SDXL buckets)', lambda: bucket_records(recs, buckets))
    def epoch(**kw):
        s = BucketBatchSampler(asg, a.batch_size, seed=0, **kw)
        n = sum(1 for _ in s)
        assert n == len(s)
        return s
    s1 = timed(f'sampler: build + 1 epoch, batch {a.batch_size}, 1 rank', epoch)
    timed(f'sampler: build + 1 epoch, batch {a.batch_size}, rank 0 of 8', lambda: epoch(num_replicas=8, rank=0))
    def resume():
        st = {**s1.state_dict(), 'position': len(s1) // 2}
        s2 = BucketBatchSampler(asg, a.batch_size, seed=0); s2.load_state_dict(st)
        return next(iter(s2))
    timed('resume: load_state_dict mid-epoch + next batch', resume)

    total = sum(t for _, t in rows)
    rate = None
    if a.files:  # the one-off header scan of real files: measured on a few, extrapolated, not in the total
        from ztsnr_nb.data.sources import scan_kohya_folder
        from ztsnr_nb.data.synthetic import make_synthetic_dataset
        with tempfile.TemporaryDirectory() as d:
            make_synthetic_dataset(d, n=a.files, seed=0, min_side=64, max_side=128)
            t = time.perf_counter(); r, _ = scan_kohya_folder(d); rate = len(r) / (time.perf_counter() - t)
    hist = bucket_histogram(asg, buckets)
    top = sorted(hist.items(), key=lambda kv: -kv[1])[:3]
    print(f'N = {a.n:,} records, {len(buckets)} buckets, {len(s1):,} batches/epoch; '
          f'busiest buckets {top}; (setup: writing the JSONL took {setup:.1f} s, not counted)')
    print(f'{"stage":55s} {"time (s)":>9s} {"of 60 s goal":>13s}')
    for name, t in rows: print(f'{name:55s} {t:9.2f} {t / GOAL_S:12.1%}')
    print(f'{"TOTAL":55s} {total:9.2f} {total / GOAL_S:12.1%}   -> {"PASS" if total < GOAL_S else "FAIL"} (goal < {GOAL_S:.0f} s)')
    if rate:
        print(f'header scan of real files (scan_kohya_folder, {a.files} PNGs, warm cache): {rate:,.0f} files/s '
              f'-> {a.n / rate:,.0f} s for {a.n:,} files (one-off; not in the total)')
    return 0 if total < GOAL_S else 1


if __name__ == '__main__':
    sys.exit(main())
