"Process-level and fuzz tests for ztsnr_nb.data.sources: mixed good/broken folders, streamed shards over HTTP and pipe:."
import functools, http.server, io, json, logging, tarfile, threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from ztsnr_nb.data.sources import (ImageError, ScanReport, iter_webdataset, load_image_rgb, make_broken_corpus, probe_image,
                             scan_imagefolder, scan_kohya_folder, scan_source)
from ztsnr_nb.data.synthetic import make_synthetic_dataset


def _shard(path, samples):
    with tarfile.open(path, 'w') as tf:
        for key, members in samples:
            for ext, data in members.items():
                ti = tarfile.TarInfo(f'{key}.{ext}'); ti.size = len(data); tf.addfile(ti, io.BytesIO(data))
    return path


@pytest.fixture(scope='module')
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp('mixed')
    good = make_synthetic_dataset(root / '3_synth', n=20, seed=0, min_side=64, max_side=160)
    corpus = make_broken_corpus(root / 'broken')  # no N_ prefix: 1 repeat
    (root / '0_disabled').mkdir(); make_synthetic_dataset(root / '0_disabled', n=2, seed=9)
    (root / '.cache').mkdir(); (root / '.cache' / 'x.png').write_bytes(b'')  # hidden: ignored, not scanned
    return root, good, corpus


def test_mixed_folder_never_raises_and_counts_are_right(mixed, tmp_path, caplog):
    root, good, corpus = mixed
    with caplog.at_level(logging.WARNING, logger='ztsnr_nb.data.sources'):
        recs, rep = scan_kohya_folder(root, report_path=tmp_path / 'report.json')
    skips = [r for o, r in corpus.values() if o == 'skip']
    repairs = [r for o, r in corpus.values() if o == 'repair']
    assert rep.seen == len(good) + len(corpus) + 2
    assert rep.kept == len(recs) == len(good) + len(corpus) - len(skips)
    expected = {r: skips.count(r) for r in set(skips)} | {'zero_repeats': 2}
    assert rep.counts['skipped'] == expected
    assert rep.counts['repaired'] == {r: repairs.count(r) for r in set(repairs)}
    for fname, (outcome, reason) in corpus.items():  # each file filed under its own reason
        path = str(root / 'broken' / fname)
        if outcome == 'skip': assert path in rep.skipped[reason]
        if outcome == 'repair': assert path in rep.repaired[reason]
    assert all(str(root / '.cache' / 'x.png') not in v for v in rep.skipped.values())
    # every skip and repair was logged with its reason
    logged = '\n'.join(r.getMessage() for r in caplog.records)
    for reason in expected: assert f'({reason})' in logged
    saved = json.loads((tmp_path / 'report.json').read_text())
    assert saved['counts'] == rep.counts and saved['skipped'] == rep.skipped
    by_name = {Path(r.path).name: r for r in recs}
    assert {r.repeats for r in recs if 'synth' in r.path} == {3}
    assert (by_name['exif_rot.jpg'].width, by_name['exif_rot.jpg'].height) == (96, 128)
    assert by_name['latin1.png'].caption == 'red_circle, café' and by_name['nocap.png'].caption == ''
    for g in good:  # good captions and sizes are read exactly
        r = by_name[g.png.name]
        with Image.open(g.png) as im: assert (r.width, r.height) == im.size
        assert r.caption == g.caption


def test_every_kept_record_loads_as_rgb(mixed):
    root, _, _ = mixed
    recs, _ = scan_kohya_folder(root)
    bad = []
    for r in recs:
        try:
            im = r.load(background=(0, 0, 0))
            assert im.mode == 'RGB' and im.size == (r.width, r.height)
        except ImageError as e: bad.append((Path(r.path).name, e.reason))
    assert bad == [('corrupt_pixels.png', 'corrupt')]  # only found by decoding, with its reason


def test_source_detection_and_imagefolder(tmp_path):
    syn = make_synthetic_dataset(tmp_path / 'hf', n=4, seed=3)
    (tmp_path / 'hf' / 'metadata.jsonl').write_text('\n'.join(
        json.dumps({'file_name': r.png.name, 'caption': r.caption}) for r in syn[:3]) + '\n')
    recs, rep = scan_source(tmp_path / 'hf')
    assert [r.source for r in recs] == ['imagefolder'] * 3 and [r.caption for r in recs] == [r.caption for r in syn[:3]]
    assert rep.counts['notes'] == {'unlisted_image': 1}
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='no metadata.jsonl'): scan_imagefolder(tmp_path / 'empty')


@pytest.fixture
def http_root(tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True); t.start()
    yield tmp_path, f'http://127.0.0.1:{srv.server_address[1]}'
    srv.shutdown(); srv.server_close()


def test_webdataset_streams_over_http_and_pipe(http_root):
    root, base = http_root
    syn = make_synthetic_dataset(root / 'src', n=6, seed=4)
    for s in range(2):
        _shard(root / f'shard-{s:03d}.tar', [(f'{s}_{i}', {'png': r.png.read_bytes(), 'txt': r.caption.encode()})
                                            for i, r in enumerate(syn[3 * s: 3 * s + 3])])
    rep = ScanReport()
    recs = list(iter_webdataset(f'{base}/shard-{{000..001}}.tar {base}/missing.tar', report=rep))
    assert [r.caption for r in recs] == [r.caption for r in syn]
    assert all(r.data is not None for r in recs)  # streamed: bytes travel with the record
    assert np.array_equal(np.asarray(recs[4].load()), np.asarray(load_image_rgb(syn[4].png)))
    assert rep.kept == 6 and rep.counts['skipped'] == {'unreadable': 1}
    with pytest.raises(ValueError, match='allow_pipe'):      # pipe: runs a shell command: opt-in only
        list(iter_webdataset(f'pipe:cat {root}/shard-000.tar'))
    piped = list(iter_webdataset(f'pipe:cat {root}/shard-000.tar', allow_pipe=True))
    assert [r.key for r in piped] == ['0_0', '0_1', '0_2']


_valid = {}
def _valid_bytes(fmt):
    if fmt not in _valid:
        rng = np.random.default_rng(0)
        b = io.BytesIO(); Image.fromarray(rng.integers(0, 255, (80, 72, 3), dtype=np.uint8)).save(b, fmt)
        _valid[fmt] = b.getvalue()
    return _valid[fmt]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(['PNG', 'JPEG', 'WEBP', 'BMP', 'GIF', 'TIFF']), cut=st.floats(0, 1),
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=4))
def test_fuzzed_images_raise_only_image_error(fmt, cut, flips):
    data = bytearray(_valid_bytes(fmt))
    data = data[: int(len(data) * cut)] if cut < 0.98 else data
    for pos, val in flips:
        if data: data[min(int(pos * len(data)), len(data) - 1)] = val
    for fn in (probe_image, load_image_rgb):
        try: fn(bytes(data))
        except ImageError as e: assert e.reason in {'zero_byte', 'not_an_image', 'truncated', 'corrupt', 'too_large', 'unreadable',
                                                    'unsupported_mode', 'too_small', 'bad_aspect'}
