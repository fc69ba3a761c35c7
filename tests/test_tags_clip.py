"""Tests for ztsnr_nb.data.tags that need torch: tag embeddings with the tiny model's text encoders, the embedding cache,
synonym effective counts, and captions read through a real latent cache index."""
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from ztsnr_nb.data import tags as T
from ztsnr_nb.data.tags import (TagCache, captions_from_cache, effective_counts, embed_tags, encoder_fingerprint, pca_2d,
                                read_captions, synonym_pairs)
from ztsnr_nb.training.config import TagsConfig
from ztsnr_nb.models.sdxl import build_tiny_sdxl


@pytest.fixture(scope='module')
def tiny():
    return build_tiny_sdxl(seed=0)


def test_embeddings_normalised_and_deterministic(tiny):
    tags = ['blonde_hair', 'yellow_hair', 'red_circle', 'solo', '']
    e = embed_tags(tags, tiny, batch_size=2)
    assert e.shape[0] == 5 and e.dtype == np.float32 and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(e, embed_tags(tags, tiny, batch_size=5))   # batching does not change a tag's vector
    p = embed_tags(tags, tiny, pooling='pooled')
    assert p.shape == (5, tiny.text_encoder_2.config.projection_dim)
    np.testing.assert_allclose(embed_tags(['blonde hair', 'Blonde_Hair'], tiny)[0], e[0], atol=1e-6)   # the prompt text counts
    with pytest.raises(ValueError, match='pooling'): embed_tags(tags, tiny, pooling='cls')
    xy = pca_2d(e)
    assert xy.shape == (5, 2) and np.isfinite(xy).all()


def test_embedding_cache_incremental_and_invalidated(tiny, tmp_path, monkeypatch):
    cache = TagCache(tmp_path / 'tags')
    calls = []
    real = T.embed_tags
    monkeypatch.setattr(T, 'embed_tags', lambda tags, *a, **k: calls.append(list(tags)) or real(tags, *a, **k))
    e1 = cache.embeddings(['a_tag', 'b_tag'], tiny)
    e2 = cache.embeddings(['b_tag', 'c_tag', 'a_tag'], tiny)
    assert calls == [['a_tag', 'b_tag'], ['c_tag']]                     # only the new tag is encoded
    np.testing.assert_array_equal(e2[[2, 0]], e1)
    other = build_tiny_sdxl(seed=1)                                     # other weights -> other fingerprint
    assert encoder_fingerprint(other) != encoder_fingerprint(tiny)
    cache.embeddings(['a_tag'], other)
    assert calls[-1] == ['a_tag'] and len(cache.entries()['embeddings']) == 1


def test_synonyms_share_effective_counts(tiny, tmp_path):
    tags = ['blonde_hair', 'yellow_hair', 'red_circle', 'smile']
    e = embed_tags(tags, tiny); cos = e @ e.T
    iu = np.triu_indices(4, 1); best = int(np.argmax(cos[iu]))
    x, y = int(iu[0][best]), int(iu[1][best])                          # the most similar pair joins, no other pair does
    thr = float(cos[x, y]) - 1e-5
    assert np.sort(cos[iu])[-2] < thr
    n = {t: k + 2 for k, t in enumerate(tags)}                          # counts 2, 3, 4, 5
    caps = [t for t in tags for _ in range(n[t])]
    cfg = TagsConfig(enabled=True, synonyms=True, synonym_threshold=thr, implied=False)
    tw = TagCache(tmp_path / 'tags').weighting(caps, cfg, model=tiny)
    i = tw.stats.index
    assert {frozenset(p[:2]) for p in tw.synonyms} == {frozenset({tags[x], tags[y]})}
    assert tw.counts[i[tags[x]]] == pytest.approx(n[tags[x]] + cos[x, y] * n[tags[y]], rel=1e-5)
    assert tw.counts[i[tags[y]]] == pytest.approx(n[tags[y]] + cos[x, y] * n[tags[x]], rel=1e-5)
    for t in set(tags) - {tags[x], tags[y]}: assert tw.counts[i[t]] == n[t]
    with pytest.raises(ValueError, match='needs the model'): TagCache(tmp_path / 't2').weighting(caps, cfg)


def test_effective_counts_and_pairs():
    e = np.eye(3, dtype=np.float32); e[1] = [0.6, 0.8, 0]
    i, j, c = synonym_pairs(e, 0.5, block=1)
    assert (i.tolist(), j.tolist()) == ([0], [1]) and c[0] == pytest.approx(0.6)
    assert effective_counts([10, 5, 1], i, j, c).tolist() == pytest.approx([13, 11, 1])


def test_captions_from_latent_cache_index(tiny, tmp_path):
    from ztsnr_nb.data.latent_cache import LatentCache
    from ztsnr_nb.data.sources import scan_source
    from ztsnr_nb.data.synthetic import make_synthetic_dataset
    recs = make_synthetic_dataset(tmp_path / 'ds', n=5, seed=0, min_side=32, max_side=40)
    (tmp_path / 'ds' / 'synth_00001.txt').write_bytes(b'caf\xe9, solo\n')       # non-UTF-8 sidecar: repaired
    records, _ = scan_source(tmp_path / 'ds', min_side=16)
    lc = LatentCache(tmp_path / 'cache' / 'latents')
    lc.build(records, tiny.vae, [(32, 32)], progress=False, num_load_threads=0)
    keys, caps = captions_from_cache(tmp_path / 'cache')
    assert sorted(keys) == keys and len(keys) == 5
    want = {str(r.png): r.caption for r in recs}; want[str(tmp_path / 'ds' / 'synth_00001.png')] = 'café, solo'
    assert dict(zip(keys, caps)) == want
    assert sorted(read_captions(tmp_path / 'cache')) == sorted(want.values())
    with pytest.raises(ValueError, match='no latent cache index'): captions_from_cache(tmp_path / 'ds')
