"Tests for ztsnr_nb.data.tags (torch-free parts): parsing, tables, statistics, curves, weights, dropout, tracker, [tags] section, cache, report and CLI."
import json
import logging
import math
import subprocess
import sys
from collections import Counter
from dataclasses import asdict
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from ztsnr_nb.data.tags import (
    TAGS_KEYS, WEIGHT_KEYS, TagCache, TagDropout, TagLossTracker, TagParser, TagTableError, TagWeighting, caption_tags,
    captions_fingerprint, combine_tag_weights, cooccurrence, curve_weights, drop_tags, dropout_probs, fit_mean_one,
    implied_mask, implied_pairs, inverse_log_weight, load_tag_table, make_reducer, normalize_tag, parse_captions,
    power_weight, rare_common_split, read_captions, report_lines, step_weight, synthetic_booru_captions, tag_statistics,
    tags_report, tags_section, weight_settings)
from ztsnr_nb.policies import TAG_CATEGORIES, TAG_STEP_TABLE
from ztsnr_nb.training.config import ConfigError, TagsConfig

ROOT = Path(__file__).resolve().parents[1]


# -- parsing -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('raw, want', [
    ('Long Hair', 'long_hair'), ('  long_hair ', 'long_hair'), ('(long hair:1.3)', 'long_hair'), ('((long hair))', 'long_hair'),
    ('[long hair]', 'long_hair'), ('{long_hair}', 'long_hair'), ('long\thair', 'long_hair'),
    (r'nakano itsuki \(gotoubun no hanayome\)', 'nakano_itsuki_(gotoubun_no_hanayome)'),
    ('hatsune_miku_(append)', 'hatsune_miku_(append)'), ('(hatsune miku (append):0.9)', 'hatsune_miku_(append)'),
    (':3', ':3'), (':d', ':d'), ('^_^', '^_^'), ('artist:WLOP', 'wlop'), ('<lora:x:1>', ''), ('', ''), ('  ', '')])
def test_normalize_tag(raw, want):
    assert normalize_tag(raw) == want


def test_bulk_parse_matches_single_caption_parse():
    rng = np.random.default_rng(0)
    weird = ['', ' ', 'Long Hair', '(smile:1.2)', 'artist:foo', 'café', 'a\x00b', '\udcff', '初音ミク', '<lora:x:1>', ',,', '1girl']
    caps = [', '.join(rng.choice(weird, size=rng.integers(0, 8))) for _ in range(500)]
    caps += list(synthetic_booru_captions(500, seed=3))
    single = TagParser(); ref = [single.ids(c) for c in caps]
    bulk = TagParser(); flat, lens = bulk.ids_many(caps)
    assert bulk.vocab == single.vocab
    assert flat.tolist() == sum(ref, []) and lens.tolist() == [len(r) for r in ref]
    pc = parse_captions(caps, chunk_size=37)   # chunk boundaries do not matter
    assert pc.flat.tolist() == flat.tolist() and pc.fingerprint == captions_fingerprint(caps)


def test_categories_prefix_table_builtin(tmp_path):
    (tmp_path / 't.csv').write_text('name,category,count,aliases\nmiku,4,10,"hatsune_miku,初音ミク"\nvocaloid,copyright,5,\n')
    p = TagParser(load_tag_table(tmp_path / 't.csv'))
    ids = p.ids('hatsune miku, vocaloid, artist:bob, rating:explicit, masterpiece, highres, bob, smile')
    cats = [TAG_CATEGORIES[p.categories[i]] for i in ids]
    assert [p.vocab[i] for i in ids] == ['miku', 'vocaloid', 'bob', 'explicit', 'masterpiece', 'highres', 'smile']
    assert cats == ['character', 'copyright', 'artist', 'rating', 'quality', 'meta', 'general']


# -- tag table -----------------------------------------------------------------------------------------------------
def test_alias_folding_counts_canonical(tmp_path):
    (tmp_path / 't.csv').write_text('1girl,0,100,"1girls,sole_female"\nblonde_hair,0,50,"yellow_hair,blond_hair"\n')
    table = load_tag_table(tmp_path / 't.csv')
    st, _ = tag_statistics(['1girls, yellow hair', 'sole_female, blonde_hair', '1girl, blond hair, 1girls'],
                           TagParser(table))
    assert st.count('1girl') == 3 and st.count('blonde_hair') == 3
    assert '1girls' not in st.index and 'yellow_hair' not in st.index


@pytest.mark.parametrize('line, words', [
    ('solo,0', 'has 2 fields'), ('solo,0,1,x,y', 'has 5 fields'), ('solo,2,10', "category '2' is unknown"),
    ('solo,0,many', "count 'many'"), ('solo,0,-3', 'negative'), (',0,3', 'empty'), ('(),0,3', 'empty')])
def test_bad_table_row_names_file_and_line(tmp_path, line, words):
    f = tmp_path / 'bad.csv'
    f.write_text(f'name,category,count\n1girl,0,100\n{line}\nsmile,0,5\n')
    with pytest.raises(TagTableError) as e: load_tag_table(f)
    assert f'{f}:3' in str(e.value) and words in str(e.value)


def test_bad_table_rows_skipped_and_logged(tmp_path, caplog):
    f = tmp_path / 'bad.csv'
    f.write_bytes(b'1girl,0,100\nsolo,0,lots\ncaf\xe9,0,3\nsmile,0,5\n')
    with caplog.at_level(logging.WARNING, logger='ztsnr_nb.data.tags'):
        t = load_tag_table(f, strict=False)
    assert sorted(t.categories) == ['1girl', 'smile'] and len(t.skipped) == 2
    assert 'bad.csv:2' in caplog.text and 'bad.csv:3' in caplog.text and 'not UTF-8' in caplog.text
    with pytest.raises(TagTableError, match='bad.csv:2: count'): load_tag_table(f, strict=True)
    with pytest.raises(TagTableError, match='cannot read'): load_tag_table(tmp_path / 'missing.csv')


def test_tag_table_write_load_round_trip(tmp_path):
    from ztsnr_nb.data.tags import booru_tag_table, booru_vocabulary, write_tag_table
    t = booru_tag_table(booru_vocabulary(n_general=300, n_characters=20, n_copyrights=5, n_artists=10))
    t2 = load_tag_table(write_tag_table(t, tmp_path / 'b.csv'))
    assert t2.categories == t.categories and t2.aliases == t.aliases
    assert {'character', 'copyright', 'artist', 'rating', 'meta', 'general'} == set(t2.categories.values())


# -- statistics ----------------------------------------------------------------------------------------------------
def _naive_pairs(caps):
    c = Counter()
    for cap in caps: c.update(combinations(sorted(set(caption_tags(cap))), 2))
    return c


@pytest.mark.parametrize('dense_top, chunk_pairs', [(2048, 8_000_000), (7, 50), (0, 1000)])
def test_cooccurrence_exact(dense_top, chunk_pairs):
    caps = list(synthetic_booru_captions(1500, seed=1, mean_tags=12)) + ['', 'solo', 'a, b, a']
    pc = parse_captions(caps)
    cm = cooccurrence(pc, dense_top=dense_top, chunk_pairs=chunk_pairs)
    got = {tuple(sorted((pc.vocab[a], pc.vocab[b]))): int(n) for a, b, n in zip(cm.a, cm.b, cm.n)}
    assert got == dict(_naive_pairs(caps)) and cm.error == 0
    assert np.all(np.diff(cm.keys) > 0)                      # sorted, unique
    i, j = pc.vocab.index('a'), pc.vocab.index('b')
    assert cm.get(i, j) == cm.get(j, i) == 1


def test_cooccurrence_lossy_is_bounded():
    caps = list(synthetic_booru_captions(1500, seed=2, mean_tags=12))
    pc = parse_captions(caps); naive = _naive_pairs(caps)
    cm = cooccurrence(pc, dense_top=0, max_pairs=2000, chunk_pairs=3000)
    assert len(cm) <= 2000 and cm.error > 0
    for a, b, n in zip(cm.a, cm.b, cm.n):
        true = naive[tuple(sorted((pc.vocab[a], pc.vocab[b])))]
        assert true - cm.error <= n <= true
    kept = {tuple(sorted((pc.vocab[a], pc.vocab[b]))) for a, b in zip(cm.a, cm.b)}
    assert all(p in kept for p, n in naive.items() if n > cm.error)   # every pair above the error bound survives


def test_bad_input_never_crashes(caplog):
    huge = ', '.join(f'filler_{i}' for i in range(10_000))
    caps = ['', huge, b'caf\xe9, 1girl', None, '1girl', ' , ,, ', b'\xff\xfe\x00junk', '1girl, solo']
    with caplog.at_level(logging.INFO, logger='ztsnr_nb.data.tags'):
        st, pc = tag_statistics(caps)
    assert st.n_captions == 8 and st.n_empty == 3 and st.count('filler_9999') == 1 and st.count('café') == 1
    assert st.cooc.truncated == 1 and 'max_tags=128' in caplog.text
    tw = TagWeighting(st, pc, TagsConfig(enabled=True, dropout=0.3))
    assert np.isfinite(tw.item_weights).all() and abs(tw.item_weights.mean() - 1) < 1e-9
    assert tw.item_weights[0] == 1.0 and tw.item_weights[3] == 1.0      # no tag: neutral weight
    d = tw.dropout()
    assert d('', 0, 0, 0) == '' and len(d(huge, 0, 0, 1).split(', ')) >= 1


def test_captions_from_folder_and_text_file(tmp_path):
    from ztsnr_nb.data.synthetic import make_synthetic_dataset
    recs = make_synthetic_dataset(tmp_path / 'ds', n=6, seed=0, min_side=16, max_side=24)
    assert read_captions(tmp_path / 'ds') == [r.caption for r in recs]
    (tmp_path / 'caps.txt').write_bytes(b'1girl, solo\ncaf\xe9\n\n')
    assert read_captions(tmp_path / 'caps.txt') == ['1girl, solo', 'café', '']
    with pytest.raises(ValueError, match='no such file'): read_captions(tmp_path / 'nope')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='no image files'): read_captions(tmp_path / 'empty')


# -- curves and weights ------------------------------------------------------------------------------------------------
def test_step_curve_boundaries():
    c = np.array([0, 9, 10, 99, 100, 999, 1000, 4999, 5000, 9999, 10000, 39999, 40000])
    assert step_weight(c).tolist() == [1.1, 1.1, 1.05, 1.05, 1.0, 1.0, 0.95, 0.95, 0.9, 0.9, 0.85, 0.85, 0.8]
    assert step_weight([5, 50], [[20, 0.5], [0, 2.0]]).tolist() == [2.0, 0.5]
    with pytest.raises(ValueError, match='end with 0'): step_weight([1], [[10, 1.0]])


def test_inverse_log_and_power_curves():
    c = np.array([1, 3, 10, 30, 100])
    assert inverse_log_weight(c)[2] == pytest.approx(1.0)           # median 10 -> weight 1
    assert np.all(np.diff(inverse_log_weight(c)) < 0)
    assert inverse_log_weight([0], m=4)[0] == pytest.approx(math.log(math.e + 4))
    assert power_weight(c, 0.5) == pytest.approx(np.sqrt(10 / c))
    assert power_weight(c, 0.0) == pytest.approx(np.ones(5))
    assert power_weight([0], 1.0, m=2)[0] == pytest.approx(2.0)       # c = 0 treated as 1
    assert curve_weights(c, 'none').tolist() == [1.0] * 5
    with pytest.raises(ValueError, match='curve='): curve_weights(c, 'cubic')


@pytest.mark.parametrize('seed', range(10))
def test_renormalisation_mean_one(seed):
    rng = np.random.default_rng(seed)
    w = np.exp(rng.normal(0, 2, size=int(rng.integers(1, 5000))))
    w[rng.random(len(w)) < 0.05] = np.nan
    f = rng.integers(1, 10, size=len(w)).astype(float)
    lo, hi = float(rng.uniform(0.05, 1)), float(rng.uniform(1, 10))
    r = fit_mean_one(w, lo, hi, f)
    assert abs(np.dot(r, f) / f.sum() - 1) < 1e-6 and r.min() >= lo - 1e-12 and r.max() <= hi + 1e-12
    assert np.all(r[np.isnan(w)] == 1.0)


def test_renormalisation_errors():
    with pytest.raises(ValueError, match='w_min <= 1 <= w_max'): fit_mean_one([1.0, 2.0], 1.2, 3.0)
    with pytest.raises(ValueError, match='finite and > 0'): fit_mean_one([1.0, -2.0])
    assert fit_mean_one([3.0, 3.0, 3.0]).tolist() == [1.0, 1.0, 1.0]


def test_combination_modes():
    pc = parse_captions(['a, b', 'b', '', 'a, c'])
    tw = np.array([1.0, 2.0, 4.0])
    np.testing.assert_allclose(combine_tag_weights(pc, tw, 'mean'), [1.5, 2, np.nan, 2.5])
    np.testing.assert_allclose(combine_tag_weights(pc, tw, 'geomean'), [math.sqrt(2), 2, np.nan, 2])
    np.testing.assert_allclose(combine_tag_weights(pc, tw, 'max'), [2, 2, np.nan, 4])


def test_implied_pair_deduplication():
    caps = (['char_a, series_x, smile'] * 8 + ['series_x, smile'] * 4 + ['smile, solo'] * 30 + ['solo'] * 20
            + ['char_a, smile'])                       # char_a (9) => series_x (12): P = 8/9 < 0.95 ...
    caps[-1] = 'char_a, series_x, smile'               # ... now 9/9
    st, pc = tag_statistics(caps)
    imp = implied_pairs(st, threshold=0.95, min_count=5)
    assert {(st.vocab[s], st.vocab[d]) for s, d in zip(imp.src, imp.dst)} == {('char_a', 'series_x')}
    tw = TagWeighting(st, pc, TagsConfig(enabled=True))
    raw = combine_tag_weights(pc, tw.tag_weights(), 'mean', tw.keep)
    i = st.index
    assert raw[0] == pytest.approx((tw.tag_weights()[i['char_a']] + tw.tag_weights()[i['smile']]) / 2)   # bundle counted once
    assert raw[8] == pytest.approx((tw.tag_weights()[i['series_x']] + tw.tag_weights()[i['smile']]) / 2)  # series alone: kept
    plain = TagWeighting(st, pc, TagsConfig(enabled=True, implied=False))
    assert plain.keep.all() and not tw.keep.all()


def test_weighting_prefers_rare_tags():
    caps = list(synthetic_booru_captions(3000, seed=0))
    st, pc = tag_statistics(caps)
    tw = TagWeighting(st, pc, TagsConfig(enabled=True, curve='power', alpha=0.5))
    sp = rare_common_split(pc, st)
    assert tw.item_weights[sp.rare].mean() > 1.0 > tw.item_weights[sp.common].mean()
    assert abs(np.average(tw.item_weights) - 1) < 1e-6
    rep = np.random.default_rng(0).integers(1, 4, size=len(pc))
    tw2 = TagWeighting(st, pc, TagsConfig(enabled=True), freq=rep)
    assert abs(np.dot(tw2.item_weights, rep) / rep.sum() - 1) < 1e-6


def test_rare_common_split():
    caps = ['rating:general, 1girl, rare_x', '1girl, solo', '1girl, solo, highres', '1girl', 'highres', '1girl, mid_y, solo',
            '1girl, mid_y']            # rarest content tag counts: 1, 3, 3, 6, -, 2, 2 (rating and meta tags ignored)
    sp = rare_common_split(caps, rare_quantile=0.3, common_quantile=0.9)
    assert sp.rare.tolist() == [0, 5, 6] and sp.common.tolist() == [3] and np.isnan(sp.score[4])
    with pytest.raises(ValueError, match='need 0 < rare < common < 1'): rare_common_split(['a'], rare_quantile=0.9, common_quantile=0.1)


# -- dropout ---------------------------------------------------------------------------------------------------------
def test_dropout_probabilities():
    p = dropout_probs([1, 9, 10, 100, 1000, 5000], 4000, 0.5, rare_below=10, common_fraction=0.25)
    assert p.tolist()[:3] == [0, 0, 0] and p[3] == pytest.approx(0.25) and p[4] == p[5] == 0.5


def test_dropout_is_pure_and_resumable():
    caps = list(synthetic_booru_captions(200, seed=4))
    st, _ = tag_statistics(caps)
    d1 = TagDropout.from_stats(st, 0.5, rare_below=5, common_fraction=0.1)
    run = {(e, i): d1(caps[i], 7, e, i) for e in range(4) for i in range(len(caps))}
    d2 = TagDropout.from_stats(*tag_statistics(caps)[:1], 0.5, rare_below=5, common_fraction=0.1)   # a "resumed" process
    assert all(d2(caps[i], 7, e, i) == run[e, i] for e in (2, 3) for i in range(len(caps)))
    assert any(run[0, i] != run[1, i] for i in range(len(caps)))                                  # epochs differ
    assert any(run[0, i] != caps[i] for i in range(len(caps)))                                    # something dropped
    for (e, i), out in run.items():
        toks, orig = out.split(', '), caps[i].split(', ')
        assert toks[0] == orig[0]                                                                 # keep_first
        assert all(t in toks for t in orig if st.count(t) < 5)                                    # rare never dropped
        assert set(toks) <= set(orig) and toks == [t for t in orig if t in toks]                   # order kept


def test_dropout_rate_matches_probability():
    probs = {'common': 0.3}
    outs = [drop_tags('first, common, other', 0, 0, i, probs) for i in range(4000)]
    rate = np.mean(['common' not in o for o in outs])
    assert abs(rate - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 4000)


# -- live tracker ----------------------------------------------------------------------------------------------------
def _weighting(n=300, seed=0):
    caps = list(synthetic_booru_captions(n, seed=seed, mean_tags=10))
    st, pc = tag_statistics(caps)
    return TagWeighting(st, pc, TagsConfig(enabled=True, live=True, live_every=5, live_min_obs=2, live_rate=0.3))


def _feed(tr, steps, seed):
    rng = np.random.default_rng(seed)
    n = len(tr.weighting)
    for _ in range(steps):
        idx = rng.integers(0, n, size=6)
        tr.observe_items(idx, rng.lognormal(0, 0.5, size=6) * (1 + (idx % 7 == 0)))
        tr.step()


def test_tracker_checkpoint_round_trip(tmp_path):
    tw = _weighting(); tr = TagLossTracker.for_weighting(tw)
    _feed(tr, 23, seed=1)                                    # 4 updates + 3 steps of a pending window
    assert tr.updates == 4 and (tr.mult != 1).any() and tr.pending[-1] > 0
    ckpt = tmp_path / 'tags_tracker.json'
    ckpt.write_text(json.dumps(tr.state_dict()))             # what the trainer writes next to trainer_state.json
    tw2 = _weighting(); tr2 = TagLossTracker.for_weighting(tw2)
    tr2.load_state_dict(json.loads(ckpt.read_text()))
    assert np.array_equal(tw2.item_weights, tw.item_weights)
    _feed(tr, 17, seed=2); _feed(tr2, 17, seed=2)
    assert np.array_equal(tr2.mult, tr.mult) and np.array_equal(tw2.item_weights, tw.item_weights)
    assert np.array_equal(np.nan_to_num(tr2.loss, nan=-1), np.nan_to_num(tr.loss, nan=-1))
    assert tr2.state_dict() == tr.state_dict()
    assert tr.mult.min() >= 0.5 and tr.mult.max() <= 2.0
    assert abs(tw.item_weights.mean() - 1) < 1e-6


def test_tracker_rejects_other_vocabulary():
    tr = TagLossTracker.for_weighting(_weighting(seed=0))
    other = TagLossTracker.for_weighting(_weighting(seed=5))
    with pytest.raises(ValueError, match='captions changed'): other.load_state_dict(tr.state_dict())


def test_tracker_gather_across_processes_equals_one_process():
    tw = _weighting()
    one = TagLossTracker.for_weighting(tw)
    a = TagLossTracker(len(tw.stats.vocab), tw.stats.vocab, every=5, min_obs=2, rate=0.3)
    b = TagLossTracker(len(tw.stats.vocab), tw.stats.vocab, every=5, min_obs=2, rate=0.3)
    rng = np.random.default_rng(0)
    pc = tw.parsed
    for step in range(20):
        idx = rng.integers(0, len(tw), size=8); loss = rng.lognormal(0, 0.5, size=8)
        one.observe_items(idx, loss)
        a.observe([pc.ids(i) for i in idx[:4]], loss[:4]); b.observe([pc.ids(i) for i in idx[4:]], loss[4:])
        pa, pb = a.pending.copy(), b.pending.copy()          # a fake all-reduce: each rank gets the sum of both
        a.reducer, b.reducer = (lambda x: x + pb), (lambda x: pa + x)
        one.step(); a.step(); b.step()
    assert one.updates == 4
    np.testing.assert_allclose(a.mult, one.mult, rtol=1e-12); np.testing.assert_array_equal(a.mult, b.mult)


def test_make_reducer():
    assert make_reducer(None) is None
    f = lambda x: x
    assert make_reducer(f) is f

    class FakeAcc:
        device, num_processes = 'cpu', 2
        def reduce(self, t, reduction): assert reduction == 'sum'; return t * 2
    r = make_reducer(FakeAcc())
    assert r(np.array([1.0, 2.0])).tolist() == [2.0, 4.0]
    FakeAcc.num_processes = 1
    assert make_reducer(FakeAcc()) is None
    with pytest.raises(ValueError, match='accelerate.Accelerator'): make_reducer(object())


# -- config ----------------------------------------------------------------------------------------------------------
BAD = dict(enabled='yes', curve='cubic', step_table=[[10, 1.0], [20, 1.0], [0, 1.1]], alpha=-1, combine='sum', w_min=0,
           w_max=0.5, category_multipliers={'painter': 1.0}, tag_table=3, table_strict=1, underscores=None, implied='no',
           implied_threshold=0.3, implied_min_count=0, implied_min_lift=0.5, synonyms=2, synonym_threshold=1.5,
           synonym_max_tags=1, dropout=1.0, dropout_rare_below=0, dropout_common_fraction=0, keep_first=-1, live='on',
           live_every=0, live_ema=1.0, live_rate=0, live_strength=9, live_min=2, live_max=0.9, live_min_obs=0, max_tags=1,
           max_pairs=10, cache_dir=5)


def test_config_every_key_checked():
    "The [tags] section (training.config.TagsConfig) checks every key it has, and has every key this module reads."
    assert set(BAD) == {f.name for f in __import__('dataclasses').fields(TagsConfig)} >= set(TAGS_KEYS)
    for k, v in BAD.items():
        with pytest.raises(ConfigError, match=rf'tags\.{k} = '): TagsConfig(**{k: v})
        c = TagsConfig()
        with pytest.raises(ConfigError, match=rf'tags\.{k} = '): setattr(c, k, v)


def test_config_defaults_off_and_round_trip():
    c = TagsConfig()
    assert not c.enabled and not c.live and c.dropout == 0 and not c.synonyms
    assert TagsConfig(**json.loads(json.dumps(asdict(c)))) == c
    assert c.step_table == [list(r) for r in TAG_STEP_TABLE]


def test_section_is_duck_typed_and_required():
    from types import SimpleNamespace
    st, pc = tag_statistics(list(synthetic_booru_captions(300, seed=0, mean_tags=10)))
    c = TagsConfig(enabled=True, alpha=0.8)
    duck = SimpleNamespace(**asdict(c))
    assert np.array_equal(TagWeighting(st, pc, duck).item_weights, TagWeighting(st, pc, c).item_weights)
    assert weight_settings(duck) == weight_settings(c) == c.weight_settings() and set(weight_settings(c)) == set(WEIGHT_KEYS)
    for bad in (None, SimpleNamespace(curve='power'), {'curve': 'power'}):
        with pytest.raises(ValueError, match=r'not a \[tags\] section'): TagWeighting(st, pc, bad)
    with pytest.raises(TypeError): TagWeighting(st, pc)                     # no hidden default
    with pytest.raises(TypeError): TagCache(Path('/tmp')).weighting(['a'])
    assert tags_section(c) is c


# -- cache -----------------------------------------------------------------------------------------------------------
def test_cache_hits_and_invalidates(tmp_path):
    caps = list(synthetic_booru_captions(400, seed=0))
    cache = TagCache(tmp_path / 'tags')
    _, _, h1 = cache.stats(caps); st, pc, h2 = cache.stats(caps)
    assert (h1, h2) == (False, True) and len(cache.entries()['stats']) == 1
    _, _, h3 = cache.stats(caps[:-1] + [caps[-1] + ', new'])
    assert not h3 and len(cache.entries()['stats']) == 1                 # the stale entry is gone
    _, _, h4 = cache.stats(caps, TagParser(underscores=False))
    assert not h4                                                          # parse settings are in the fingerprint
    tw1 = cache.weighting(caps, TagsConfig(enabled=True)); tw2 = cache.weighting(caps, TagsConfig(enabled=True))
    assert np.array_equal(tw1.item_weights, tw2.item_weights) and len(cache.entries()['weights']) == 1
    w_path = next((tmp_path / 'tags' / 'weights').iterdir())
    tw3 = cache.weighting(caps, TagsConfig(enabled=True, alpha=1.0))
    assert not w_path.exists() and not np.array_equal(tw3.item_weights, tw1.item_weights)


def test_cache_survives_damage(tmp_path, caplog):
    caps = ['1girl, solo', 'solo']
    cache = TagCache(tmp_path / 'tags'); cache.stats(caps)
    p = next((tmp_path / 'tags' / 'stats').iterdir())
    (p / 'arrays.npz').write_bytes(b'not a zip')
    with caplog.at_level(logging.WARNING, logger='ztsnr_nb.data.tags'):
        st, _, hit = cache.stats(caps)
    assert not hit and st.count('solo') == 2 and 'damaged' in caplog.text


# -- report and CLI --------------------------------------------------------------------------------------------------
def test_report_and_lines(tmp_path):
    caps = list(synthetic_booru_captions(300, seed=0))
    r = tags_report(None, tmp_path / 'out', 4, TagsConfig(), captions=caps)
    lines = report_lines(r, 4)
    assert lines[0].startswith('300 captions (0 empty)') and len(lines) == 1 + 4 + 1 and lines[-1].startswith('wrote ')
    assert [ln.split()[1] for ln in lines[1:-1]] == [t for t, _, _ in r['weighting'].stats.top(4)]
    assert len(report_lines(r, 50)) == 1 + 10 + 1                        # at most 10 tags on the console
    assert json.loads((tmp_path / 'out' / 'summary.json').read_text()) == r['summary']
    with pytest.raises(ValueError, match='top=0'): tags_report(None, tmp_path / 'o2', 0, TagsConfig(), captions=caps)


def _cli(*args):
    "ztsnr_nb_tags (ztsnr_nb.cli.tags_main) in a fresh process."
    code = 'import sys; from ztsnr_nb.cli import tags_main; sys.exit(tags_main(sys.argv[1:]))'
    return subprocess.run([sys.executable, '-c', code, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**__import__('os').environ, 'OMP_NUM_THREADS': '1', 'MPLBACKEND': 'Agg'})


def test_cli_writes_csv_and_plots(tmp_path):
    (tmp_path / 'caps.txt').write_text('\n'.join(synthetic_booru_captions(500, seed=0)))
    r = _cli(tmp_path / 'caps.txt', '--top', 7, '--out', tmp_path / 'out', '--set', 'curve=step')
    assert r.returncode == 0, r.stderr
    names = {p.name for p in (tmp_path / 'out').iterdir()}
    assert {'tags.csv', 'pairs.csv', 'frequency.png', 'curves.png', 'pairs_heatmap.png', 'summary.json'} <= names
    rows = (tmp_path / 'out' / 'tags.csv').read_text().splitlines()
    assert rows[0] == 'rank,tag,category,count,frequency,effective_count,tag_weight,dropout_p' and len(rows) == 8
    assert '500 captions' in r.stdout


def test_cli_bad_input_exit_2(tmp_path):
    r = _cli(tmp_path / 'missing', '--quiet')
    assert r.returncode == 2 and 'no such file or folder' in r.stderr and 'Traceback' not in r.stderr
    (tmp_path / 'c.txt').write_text('a, b\n')
    r = _cli(tmp_path / 'c.txt', '--set', 'curv=step', '--quiet')
    assert r.returncode == 2 and "unknown key 'tags.curv'" in r.stderr and 'tags.curve' in r.stderr
    r = _cli(tmp_path / 'c.txt', '--set', 'alpha=-2', '--quiet')
    assert r.returncode == 2 and 'tags.alpha = -2' in r.stderr
