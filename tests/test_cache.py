"Process-level tests for ztsnr_nb.data.latent_cache / ztsnr_nb.data.dataset: SIGKILL + resume, concurrent ranks, rank lock, spawned workers."
import gc, json, multiprocessing, sqlite3, subprocess, sys, time
from pathlib import Path

import pytest
import torch

from ztsnr_nb.data.buckets import BucketBatchSampler, make_buckets
from ztsnr_nb.data.dataset import CachedLatentDataset, make_dataloader
from ztsnr_nb.data.sources import scan_kohya_folder
from ztsnr_nb.data.latent_cache import LatentCache, TextEmbeddingCache
from ztsnr_nb.models.sdxl import TinySDXLConfig, build_tiny_sdxl, build_vae
from ztsnr_nb.data.synthetic import make_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
N = 24
BUCKETS = make_buckets(max_area=96 * 96, step=32, min_side=64, max_side=192)

CHILD = r'''
import json, sys, time, torch
torch.set_num_threads(1)
from ztsnr_nb.data.sources import scan_kohya_folder
from ztsnr_nb.data.buckets import make_buckets
from ztsnr_nb.models.sdxl import build_vae, TinySDXLConfig
from ztsnr_nb.data.latent_cache import LatentCache
folder, cache, rank, world, delay = sys.argv[1:6]
recs, _ = scan_kohya_folder(folder)
vae = build_vae(TinySDXLConfig(), seed=0)
encode = vae.encode
def slow_encode(x, *a, **k):
    time.sleep(float(delay)); return encode(x, *a, **k)
vae.encode = slow_encode          # same weights, same fingerprint; just slow enough to be killed midway
rep = LatentCache(cache).build(recs, vae, make_buckets(max_area=96 * 96, step=32, min_side=64, max_side=192),
                               batch_size=2, shard_size=2, rank=int(rank), world_size=int(world), progress=False)
print(json.dumps(dict(encoded=rep.encoded, cached=rep.cached, owned=rep.owned, failed=len(rep.failed))))
'''


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp('ds')
    make_synthetic_dataset(folder, n=N, seed=0, min_side=64, max_side=128)
    recs, _ = scan_kohya_folder(folder)
    assert len(recs) == N
    return folder, recs


def _child(folder, cache, rank=0, world=1, delay=0.0):
    return subprocess.Popen([sys.executable, '-c', CHILD, str(folder), str(cache), str(rank), str(world), str(delay)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _committed(cache) -> int:
    "Items committed to the index, read the way another process would (0 while the index does not exist yet)."
    db = Path(cache) / 'index.sqlite'
    if not db.exists(): return 0
    try:
        con = sqlite3.connect(db, timeout=5)
        try: return con.execute('SELECT count(*) FROM items').fetchone()[0]
        finally: con.close()
    except sqlite3.OperationalError: return 0  # schema not created yet


def _counting_vae():
    vae = build_vae(TinySDXLConfig(), seed=0)
    n = {'images': 0}
    encode = vae.encode
    def counted(x, *a, **k):
        n['images'] += x.shape[0]; return encode(x, *a, **k)
    vae.encode = counted
    return vae, n


def test_sigkill_midway_then_resume_encodes_only_the_rest(data, tmp_path):
    folder, recs = data
    torch.set_num_threads(1)
    cache = tmp_path / 'cache'
    p = _child(folder, cache, delay=0.4)
    t0 = time.time()
    try:
        while _committed(cache) < 6:
            assert p.poll() is None, f'child ended before it could be killed: {p.communicate()}'
            assert time.time() - t0 < 240, 'child made no progress'
            time.sleep(0.05)
        # while the child holds rank 0, a second builder of rank 0 is refused
        with pytest.raises(RuntimeError, match='another process is building rank 0'):
            LatentCache(cache).build(recs, build_vae(TinySDXLConfig(), seed=0), BUCKETS, progress=False)
    finally:
        p.kill()  # SIGKILL: no cleanup, no flush
        p.wait()
    assert p.returncode == -9
    done = len(LatentCache(cache))
    assert 6 <= done < N, done  # killed midway
    vae, n = _counting_vae()
    c = LatentCache(cache)
    rep = c.build(recs, vae, BUCKETS, batch_size=2, shard_size=2, progress=False)
    assert (rep.cached, rep.encoded, len(rep.failed)) == (done, N - done, 0)
    assert n['images'] == N - done  # finished items were not encoded again
    assert len(c) == N
    # no orphan or temporary shard files are left, and every index row points at an existing shard
    names = {name for (name,) in c.db.execute('SELECT name FROM shards')}
    assert {f.name for f in (cache / 'shards').iterdir()} == names
    # the resumed cache equals an uninterrupted build
    ref = LatentCache(tmp_path / 'ref')
    ref.build(recs, build_vae(TinySDXLConfig(), seed=0), BUCKETS, batch_size=2, progress=False)
    for r in recs:
        a, b = c.get(r.id), ref.get(r.id)
        torch.testing.assert_close(a.mean.float(), b.mean.float(), atol=2e-3, rtol=2e-3)
        assert a.time_ids == b.time_ids
    # and a further run has nothing to do
    assert c.build(recs, vae, BUCKETS, progress=False).encoded == 0


def test_two_ranks_build_concurrently(data, tmp_path):
    folder, recs = data
    cache = tmp_path / 'cache'
    procs = [_child(folder, cache, rank=r, world=2, delay=0.05) for r in (0, 1)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(o['encoded'] for o in outs) == N and all(o['failed'] == 0 for o in outs)
    assert all(0 < o['owned'] < N for o in outs) and sum(o['owned'] for o in outs) == N
    c = LatentCache(cache)
    assert len(c) == N and set(c.keys()) == {r.id for r in recs}
    assert {n[:4] for (n,) in c.db.execute('SELECT name FROM shards')} == {'r000', 'r001'}


def test_dataset_in_spawned_workers(data, tmp_path):
    "The dataset pickles (no SQLite connection or mmap handles cross processes) and gives the same batches in workers."
    folder, recs = data
    tiny = build_tiny_sdxl(seed=0)
    lc = LatentCache(tmp_path / 'lat'); lc.build(recs, tiny.vae, BUCKETS, batch_size=8, progress=False)
    tc = TextEmbeddingCache(tmp_path / 'txt')
    tc.build([r.caption for r in recs], tiny.text_encoder, tiny.text_encoder_2, tiny.tokenizer, tiny.tokenizer_2, progress=False)
    ds = CachedLatentDataset(lc, recs, text_cache=tc, seed=3)
    ds[0]  # open the connection and a shard handle in the parent first
    sampler = BucketBatchSampler(ds.bucket_indices, batch_size=4, seed=1)
    main = list(make_dataloader(ds, sampler, num_workers=0))
    spawned = list(make_dataloader(ds, sampler, num_workers=1, multiprocessing_context='spawn', persistent_workers=False))
    assert [b['key'] for b in main] == [b['key'] for b in spawned]
    for a, b in zip(main, spawned):
        torch.testing.assert_close(a['latents'], b['latents'], atol=0, rtol=0)
        torch.testing.assert_close(a['prompt_embeds'], b['prompt_embeds'], atol=0, rtol=0)


_INHERITED_CACHE = None


def _forked_read(key, q):
    "In a forked child: use the parent's LatentCache object as inherited (index, connection, shard handles)."
    c = _INHERITED_CACHE
    n = len(c)            # needs SQLite: the child must open its own connection
    gc.collect()          # the parent's connection object must not be closed from here
    q.put((n, c.get(key).mean.tolist()))


def test_forked_child_reads_and_parent_keeps_writing(data, tmp_path):
    global _INHERITED_CACHE
    folder, recs = data
    vae = build_vae(TinySDXLConfig(), seed=0)
    c = LatentCache(tmp_path / 'c')
    c.build(recs[:6], vae, BUCKETS, progress=False)
    ref = c.get(recs[1].id).mean.tolist()  # parent has a connection and an open shard handle now
    _INHERITED_CACHE = c
    ctx = multiprocessing.get_context('fork')
    q = ctx.Queue()
    p = ctx.Process(target=_forked_read, args=(recs[1].id, q)); p.start()
    n, got = q.get(timeout=120); p.join(60)
    assert p.exitcode == 0 and n == 6 and got == ref
    rep = c.build(recs[:12], vae, BUCKETS, progress=False)  # the parent's connection still works for writing
    assert (rep.cached, rep.encoded, len(c)) == (6, 6, 12)
