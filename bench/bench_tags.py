#!/usr/bin/env python
"""Tag statistics at scale: parse + counts + sparse co-occurrence of N booru-like captions (default 1,000,000 x ~30 tags),
then implied pairs and per-sample weights; wall time per stage and peak RSS, against baselines measured in the same run.

  python bench/bench_tags.py            # 1,000,000 captions (target: stats < 60 s, peak RSS < 2 GiB)
  python bench/bench_tags.py --quick    # 50,000 captions, smoke test

Baselines (same captions, same process): `Counter` tag counting in pure Python over all captions, and `Counter` of
`itertools.combinations` pair counting on a subsample (the obvious implementation), reported as ratios.
Spread: each timed stage runs --repeats times (median, min-max)."""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import threading
import time
from collections import Counter
from itertools import combinations

os.environ.setdefault('OMP_NUM_THREADS', '1')
import numpy as np

from ztsnr_nb.data.tags import (TagWeighting, booru_vocabulary, caption_tags, captions_fingerprint, cooccurrence,
                                parse_captions, synthetic_booru_captions, tag_statistics)
from ztsnr_nb.training.config import TagsConfig

GiB = 1024 ** 3


def rss() -> int:
    "Resident set size of this process in bytes (Linux /proc; 0 elsewhere)."
    try:
        with open('/proc/self/statm') as f: return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except OSError: return 0


class PeakRSS:
    "Sample RSS every 20 ms in a thread; .peak is the maximum seen inside the with-block."
    def __enter__(self):
        self.peak, self._stop = rss(), False
        self._t = threading.Thread(target=self._run, daemon=True); self._t.start(); return self
    def _run(self):
        while not self._stop: self.peak = max(self.peak, rss()); time.sleep(0.02)
    def __exit__(self, *a):
        self._stop = True; self._t.join(); self.peak = max(self.peak, rss())


CPU: dict[int, list[float]] = {}   # id(list of wall times) -> CPU times of the same runs


def timed(fn, repeats: int):
    "(result of the last run, list of wall times); the CPU times of this process go to CPU[id(list)]."
    ts, cs, out = [], [], None
    for _ in range(repeats):
        gc.collect(); t, c = time.perf_counter(), time.process_time()
        out = fn(); ts.append(time.perf_counter() - t); cs.append(time.process_time() - c)
    CPU[id(ts)] = cs
    return out, ts


def fmt(ts) -> str:
    s = f'{statistics.median(ts):7.2f} s' + (f'  [{min(ts):.2f}, {max(ts):.2f}]' if len(ts) > 1 else '')
    cs = CPU.get(id(ts))
    return s + (f'  (CPU {statistics.median(cs):.2f} s)' if cs else '')


def naive_counts(caps):
    return Counter(t.strip() for c in caps for t in c.split(',') if t.strip())


def naive_pairs(caps):
    c = Counter()
    for cap in caps: c.update(combinations(sorted(set(caption_tags(cap))), 2))
    return c


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--n', type=int, default=None, help='captions (default 1,000,000; --quick: 50,000)')
    p.add_argument('--tags', type=int, default=30, help='mean tags per caption (default 30)')
    p.add_argument('--repeats', type=int, default=None, help='timed runs per stage (default 1; --quick: 3)')
    p.add_argument('--pairs-sample', type=int, default=5000, help='captions for the naive pair-counting baseline')
    p.add_argument('--quick', action='store_true', help='smoke mode: 50,000 captions, 3 repeats')
    a = p.parse_args(argv)
    n = a.n or (50_000 if a.quick else 1_000_000)
    reps = a.repeats or (3 if a.quick else 1)
    print(f'bench_tags: {n:,} captions, ~{a.tags} tags each, {reps} repeat(s), OMP_NUM_THREADS={os.environ["OMP_NUM_THREADS"]}, '
          f'load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs')

    t = time.perf_counter()
    vocab = booru_vocabulary(seed=0)
    caps = list(synthetic_booru_captions(n, seed=0, mean_tags=a.tags, vocab=vocab))
    n_tags = sum(c.count(',') + 1 for c in caps[:20000]) / min(n, 20000)
    print(f'generated in {time.perf_counter() - t:.1f} s: {n_tags:.1f} tags per caption, '
          f'{sum(map(len, caps[:20000])) / min(n, 20000):.0f} chars; RSS with captions {rss() / GiB:.2f} GiB')
    base_rss = rss()

    _, t_base = timed(lambda: naive_counts(caps), reps)
    fp, t_fp = timed(lambda: captions_fingerprint(caps), reps)
    with PeakRSS() as mem:
        pc, t_parse = timed(lambda: parse_captions(caps), reps)
        (st, _), t_stats = timed(lambda: tag_statistics(pc), reps)   # counts + co-occurrence from the parse
    total = [a_ + b_ for a_, b_ in zip(t_parse, t_stats)]
    CPU[id(total)] = [a_ + b_ for a_, b_ in zip(CPU[id(t_parse)], CPU[id(t_stats)])]
    tw, t_w = timed(lambda: TagWeighting(st, pc, TagsConfig(enabled=True)), reps)
    sub = caps[:a.pairs_sample]
    _, t_np = timed(lambda: naive_pairs(sub), 1)
    pc_sub = parse_captions(sub)
    _, t_op = timed(lambda: cooccurrence(pc_sub), max(reps, 3))

    print(f'\nstage                         median     [min, max]')
    print(f'fingerprint (BLAKE2b)         {fmt(t_fp)}')
    print(f'parse (normalise, ids)        {fmt(t_parse)}')
    print(f'counts + co-occurrence        {fmt(t_stats)}   {st.cooc}')
    print(f'= statistics                  {fmt(total)}')
    print(f'implied pairs + weights       {fmt(t_w)}   {tw}')
    print(f'\nbaseline Counter tag counts   {fmt(t_base)}  -> statistics/baseline = {statistics.median(total) / statistics.median(t_base):.2f}x '
          f'(statistics also normalise, fold, pair)')
    print(f'pairs on {len(sub):,} captions: naive Counter {t_np[0]:.2f} s, cooccurrence {fmt(t_op).strip()} -> '
          f'{t_np[0] / statistics.median(t_op):.1f}x faster')
    peak = mem.peak
    print(f'\npeak RSS during statistics {peak / GiB:.2f} GiB (captions alone {base_rss / GiB:.2f} GiB, '
          f'statistics added {(peak - base_rss) / GiB:.2f} GiB)')
    ok_t, ok_m = statistics.median(total) < 60, peak < 2 * GiB
    if n >= 1_000_000:
        print(f'target (1M captions): statistics < 60 s wall: {"PASS" if ok_t else "FAIL"} '
              f'({statistics.median(total):.1f} s wall, {statistics.median(CPU[id(total)]):.1f} s CPU, load average now '
              f'{os.getloadavg()[0]:.1f}); peak RSS < 2 GiB: {"PASS" if ok_m else "FAIL"}')
    return 0 if (ok_t and ok_m) or n < 1_000_000 else 1


if __name__ == '__main__':
    sys.exit(main())
