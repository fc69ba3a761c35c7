"Process-level tests for ztsnr_nb.data.synthetic: the console entry, determinism across processes, skew, bad args."
import subprocess, sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ztsnr_nb.data.synthetic import TAGS, make_synthetic_dataset, mean_luma, tag_counts

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args):
    return subprocess.run([str(Path(sys.executable).parent / 'ztsnr_nb_make_dataset'), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def test_cli_writes_kohya_pairs_and_matches_api(tmp_path):
    r = _cli(tmp_path / 'cli', '--n', 6, '--seed', 3, '--min-side', 32, '--max-side', 64, '--quiet')
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (tmp_path / 'cli').iterdir())
    assert names == sorted([f'synth_{i:05d}.png' for i in range(6)] + [f'synth_{i:05d}.txt' for i in range(6)])
    make_synthetic_dataset(tmp_path / 'api', n=6, seed=3, min_side=32, max_side=64)
    assert _snapshot(tmp_path / 'cli') == _snapshot(tmp_path / 'api')  # same bytes from another process


def test_seed_changes_images(tmp_path):
    a = make_synthetic_dataset(tmp_path / 'a', n=8, seed=0, min_side=32, max_side=64)
    b = make_synthetic_dataset(tmp_path / 'b', n=8, seed=1, min_side=32, max_side=64)
    assert [r.png.read_bytes() for r in a] != [r.png.read_bytes() for r in b]


def test_sizes_captions_and_solids(tmp_path):
    recs = make_synthetic_dataset(tmp_path, n=40, seed=5, min_side=40, max_side=90, solid_fraction=0.25)
    sizes = set()
    for png, cap in recs:
        with Image.open(png) as im:
            assert im.mode == 'RGB' and 40 <= min(im.size) and max(im.size) <= 90
            sizes.add(im.size)
            tags = cap.split(', ')
            assert set(tags) <= set(TAGS) and len(tags) == len(set(tags))
            if 'black_background' in tags and 'solid_color' in tags: assert mean_luma(im) < 16
            if 'white_background' in tags and 'solid_color' in tags: assert mean_luma(im) > 239
    assert len(sizes) > 20  # varied sizes and aspect ratios
    cnt = tag_counts(recs)
    assert cnt['solid_color'] == 10 and cnt['dark'] >= 5 and cnt['bright'] >= 5


def test_skewed_frequencies(tmp_path):
    cnt = tag_counts(make_synthetic_dataset(tmp_path, n=200, seed=0, min_side=16, max_side=24))
    counts = sorted(cnt.values(), reverse=True)
    assert counts[0] >= 100 and counts[0] >= 20 * counts[-1]  # very common and rare tags coexist
    assert cnt['red_circle'] > cnt['brown_circle'] >= 0


@pytest.mark.parametrize('args, name', [(['--n', '-1'], 'n=-1'), (['--min-side', '0'], 'min_side=0'),
                                        (['--max-side', '0'], 'max_side=0'), (['--solid-fraction', '2'], 'solid_fraction=2'),
                                        (['--n', 'x'], '--n')])
def test_cli_bad_args_exit_2_one_line(tmp_path, args, name):
    r = _cli(tmp_path / 'out', '--quiet', *args)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and 'error' in lines[0] and name in lines[0], r.stderr
    assert not (tmp_path / 'out').exists() or not any((tmp_path / 'out').iterdir())


def test_cli_unwritable_output(tmp_path):
    f = tmp_path / 'file.txt'; f.write_text('x')
    r = _cli(f / 'sub', '--n', 2, '--quiet')
    assert r.returncode == 2 and 'not writable' in r.stderr and str(f) in r.stderr
    r = _cli(f, '--n', 2, '--quiet')
    assert r.returncode == 2 and 'not a directory' in r.stderr
