"Process-level tests for `ztsnr_nb_generate` (ztsnr_nb.cli.generate_main): PNGs + metadata, determinism, img2img, bad input."
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ztsnr_nb.cli import generate_main as main
from ztsnr_nb.inference.generate import SDXLGenerator, parse_a1111_parameters
from ztsnr_nb.models.sdxl import save_tiny_sdxl

ROOT = Path(__file__).resolve().parents[1]
SMALL = ['--steps', '3', '--width', '64', '--height', '64', '--quiet']


def _cli(*args):
    return subprocess.run([str(Path(sys.executable).parent / 'ztsnr_nb_generate'), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def model(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp('tiny') / 'model', seed=0)


def _pixels(path):
    with Image.open(path) as im: return np.asarray(im.convert('RGB'))


def test_txt2img_writes_pngs_with_parameters(model, tmp_path):
    out = tmp_path / 'out'
    r = _cli('--model', model, '--prompt', '(red_circle:1.2), blue_background', '--negative', 'lowres',
             '--out', out, '--seed', 11, '--n', 2, '--cfg', 4.5, *SMALL)
    assert r.returncode == 0, r.stderr
    files = sorted(out.glob('*.png'))
    assert [f.name for f in files] == ['00000-11.png', '00001-12.png']
    with Image.open(files[1]) as im:
        assert im.size == (64, 64)
        meta, js = parse_a1111_parameters(im.text['parameters']), json.loads(im.text['ztsnr_nb'])
    assert meta['prompt'] == '(red_circle:1.2), blue_background' and meta['negative_prompt'] == 'lowres'
    assert (meta['Steps'], meta['Seed'], meta['CFG scale'], meta['Size'], meta['Sampler']) == ('3', '12', '4.5', '64x64', 'Euler')
    assert (meta['CFG rescale'], meta['ZTSNR'], meta['Prediction'], meta['Model']) == ('0.7', 'True', 'v', 'model')
    assert js['seed'] == 12 and js['spacing'] == 'trailing' and js['sigma_max'] == 4096.0
    # the same image from the API in this process (seeded per image: image 1 of seed 11 == seed 12 alone)
    gen = SDXLGenerator.from_pretrained(model)
    api = gen.txt2img('(red_circle:1.2), blue_background', negative_prompt='lowres', width=64, height=64, seed=12,
                      steps=3, cfg_scale=4.5, progress=False)[0]
    assert np.abs(np.asarray(api).astype(int) - _pixels(files[1]).astype(int)).max() <= 1
    # a second run (another process, batch of 1) numbers after the existing files and reproduces image 0
    r = _cli('--model', model, '--prompt', '(red_circle:1.2), blue_background', '--negative', 'lowres',
             '--out', out, '--seed', 11, '--cfg', 4.5, *SMALL)
    assert r.returncode == 0, r.stderr
    assert (out / '00002-11.png').is_file()
    assert np.abs(_pixels(out / '00002-11.png').astype(int) - _pixels(files[0]).astype(int)).max() <= 1


def test_img2img_and_overrides(model, tmp_path):
    src = tmp_path / 'in.png'
    Image.new('RGB', (64, 48), (200, 30, 30)).save(src)
    r = _cli('--model', model, '--prompt', 'blue_background', '--out', tmp_path / 'o', '--img2img', src, '--strength', 0.5,
             '--steps', 4, '--seed', 1, '--sampler', 'ddim', '--no-ztsnr', '--spacing', 'leading', '--quiet')
    assert r.returncode == 0, r.stderr
    (f,) = sorted((tmp_path / 'o').glob('*.png'))
    with Image.open(f) as im:
        assert im.size == (64, 48)   # the input's size
        meta = parse_a1111_parameters(im.text['parameters'])
    assert (meta['Denoising strength'], meta['Sampler'], meta['ZTSNR'], meta['Spacing']) == ('0.5', 'DDIM', 'False', 'leading')


@pytest.mark.parametrize('args, says', [
    (['--model', 'MISSING', '--prompt', 'x', '--out', 'o'], "does not exist"),
    (['--model', 'MODEL', '--prompt', 'x', '--out', 'o', '--width', '100'], 'width=100'),
])
def test_bad_input_exits_2_with_one_line(model, tmp_path, args, says):
    args = [str(model) if a == 'MODEL' else str(tmp_path / a) if a in ('MISSING', 'o') else a for a in args]
    r = _cli(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith('ztsnr_nb_generate: error:') and says in lines[0], r.stderr
    assert not list(tmp_path.glob('o/*.png'))


def test_more_bad_input_in_process(model, tmp_path, capsys):
    base = ['--model', str(model), '--prompt', 'x', '--out', str(tmp_path / 'o'), '--quiet']
    cases = [(['--model'], 'expected one argument'),                                    # argparse, one line too
             (['--steps', '4', '--img2img', str(model / 'model_index.json')], 'cannot be read as an image'),
             (['--steps', '2', '--strength', '0.2', '--img2img', 'IMG'], 'strength=0.2'),
             (['--steps', '0', '--width', '64', '--height', '64'], 'SamplerConfig.steps=0'),
             (['--cfg-rescale', '2', '--width', '64', '--height', '64'], 'cfg_rescale'),
             (['--prediction', 'epsilon', '--ztsnr', '--width', '64', '--height', '64'], 'zero terminal SNR'),
             (['--terminal-sigma', 'huge', '--width', '64', '--height', '64'], '--terminal-sigma')]
    img = tmp_path / 'in.png'; Image.new('RGB', (64, 64)).save(img)
    for extra, says in cases:
        extra = [str(img) if a == 'IMG' else a for a in extra]
        rc = _rc(base + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and says in err[0], (extra, rc, err)


def _rc(argv):
    "main's exit code, whether returned or raised by argparse."
    try: return main(argv)
    except SystemExit as e: return e.code
