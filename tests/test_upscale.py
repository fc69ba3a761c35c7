"Tiled upscaler (ztsnr_nb.inference.upscale, .usdu): exact tile cover, micro-conditioning, seam-fix bands, oracle colour, CLI, bad input."
import json
import math
import random

import pytest
import torch
from PIL import Image

from ztsnr_nb.inference.generate import SDXLGenerator, save_png
from ztsnr_nb.inference.sampling import SamplerConfig
from ztsnr_nb.inference.upscale import (Box, SolidOracleUNet, TileRunner, UpscaleConfig, colour_drift, cross_tile_layers,
                                        make_grid, remove_cross_tile_attention, seam_fix_regions, set_cross_tile_attention,
                                        tile_time_ids, tiled_upscale, upscale_latent, upscale_main, upscaled_size)
from ztsnr_nb.inference.usdu import usdu_config
from ztsnr_nb.models.sdxl import build_tiny_sdxl
from ztsnr_nb.schedule import SolidOracle

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def tiny():
    return build_tiny_sdxl(seed=0)


def _cover_ok(g):
    count = torch.zeros(g.height, g.width, dtype=torch.int32)
    for t in g.tiles:
        t.core.crop(count, 1).add_(1)
        w, c = t.window, t.core
        assert (w.width, w.height) == g.window_size
        assert 0 <= w.left <= c.left and c.right <= w.right <= g.width and 0 <= w.top <= c.top and c.bottom <= w.bottom <= g.height
        assert c.width <= g.tile_width and c.height <= g.tile_height
        assert all(v % 8 == 0 for v in (w.left, w.top, w.width, w.height, c.left, c.top, c.width, c.height))
        for inner, ctx, room in ((c.left > 0, c.left - w.left, c.left), (c.right < g.width, w.right - c.right, g.width - c.right),
                                 (c.top > 0, c.top - w.top, c.top), (c.bottom < g.height, w.bottom - c.bottom, g.height - c.bottom)):
            assert not inner or ctx >= min(g.padding, room)          # padding, or all there is up to the canvas edge
    assert bool((count == 1).all())
    ov = g.overlaps()
    row0 = [t for t in g.tiles if t.row == 0]
    assert ov['x'] == [a.window.intersect(b.window).width if a.window.intersect(b.window) else 0 for a, b in zip(row0, row0[1:])]
    total = sum(g.canvas_mask(t) for t in g.tiles)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)


def test_grid_covers_exactly_for_odd_sizes():
    rng = random.Random(0)
    g = make_grid(1000, 744, 512, padding=32, mask_blur=16)
    assert [t.core.width for t in g.tiles if t.row == 0] == [504, 496] and g.overlaps() == {'x': [152], 'y': [408]}
    _cover_ok(g)
    for _ in range(60):
        W, H = 8 * rng.randint(1, 260), 8 * rng.randint(1, 260)
        tw, th = rng.randint(8, W), rng.randint(8, H)
        tw, th = min(8 * round(tw / 8), W) or 8, min(8 * round(th / 8), H) or 8
        _cover_ok(make_grid(W, H, tw, th, padding=rng.choice([0, 7, 16, 64]), mask_blur=rng.choice([0, 4, 16])))


def test_per_tile_micro_conditioning_by_hand():
    g = make_grid(2048, 1536, 1024, 768, padding=64)
    assert [t.window for t in g.tiles] == [Box(0, 0, 1152, 896), Box(896, 0, 1152, 896), Box(0, 640, 1152, 896), Box(896, 640, 1152, 896)]
    assert tile_time_ids((1536, 2048), g.tiles[1].window) == [1536, 2048, 0, 896, 896, 1152]
    assert tile_time_ids((1536, 2048), g.tiles[3].window) == [1536, 2048, 640, 896, 896, 1152]


class _RecordingOracle(TileRunner):
    "The solid-image oracle as a runner, recording the time ids the engine passes per window."
    def __init__(self): self.seen = []
    def denoiser(self, time_ids):
        self.seen += [tuple(int(v) for v in row) for row in time_ids]
        return SolidOracle().denoise


def test_engine_passes_window_time_ids_and_keeps_solid_colour():
    r = _RecordingOracle()
    out, info = upscale_latent(r, torch.full((1, 4, 64, 48), -0.6), UpscaleConfig(tile_width=256, padding=32, order='chess'),
                               SamplerConfig(steps=28), seed=0)
    assert sorted(set(r.seen)) == [(512, 384, 0, 0, 320, 320), (512, 384, 0, 64, 320, 320), (512, 384, 192, 0, 320, 320),
                                   (512, 384, 192, 64, 320, 320)]
    assert info['tiles']['regions'] == 4 and info['tiles']['steps'] == 8
    assert colour_drift(out[0], torch.full_like(out[0], -0.6), info['grid'])['max'] < 0.02


@pytest.mark.parametrize('mode,half_px', [('band_pass', 32), ('half_tile', 256), ('half_tile_intersections', 256)])
def test_seam_fixes_touch_only_their_bands(mode, half_px):
    g = make_grid(1536, 1024, 512, padding=32, mask_blur=16)
    x0 = torch.randn(1, 4, 128, 192, generator=torch.Generator().manual_seed(0))
    out, _ = upscale_latent(_RecordingOracle(), x0, UpscaleConfig(tile_width=512, padding=32, order='none', seam_fix=mode,
                                                                   seam_fix_width=64), SamplerConfig(steps=12), seed=1)
    changed = (out != x0).any(1)[0]
    yy, xx = torch.meshgrid(torch.arange(128) * 8 + 4.0, torch.arange(192) * 8 + 4.0, indexing='ij')
    near = torch.zeros_like(changed)
    for e in g.col_edges[1:-1]: near |= (xx - e).abs() < half_px
    for e in g.row_edges[1:-1]: near |= (yy - e).abs() < half_px
    assert changed.any() and not (changed & ~near).any()
    assert len(seam_fix_regions(g, mode)) >= 2


def test_oracle_2x_solid_keeps_colour_per_tile(tiny):
    gen = SDXLGenerator.from_components(tiny.replace(unet=SolidOracleUNet(), scheduler=None), config=SamplerConfig(steps=28, cfg_scale=1.0))
    for kw in (dict(), dict(cross_tile_attention='all', reference_scale=0.5), dict(mode='multidiffusion')):
        out = tiled_upscale(gen, torch.full((1, 4, 128, 128), -0.6), output_type='latent', seed=3, tile_width=1024, padding=64,
                            strength=0.3, progress=False, **kw)[0]
        d = colour_drift(out, torch.full_like(out, -0.6), make_grid(2048, 2048, 1024, padding=64))
        assert d['max'] < 0.02, (kw, d)


def test_cross_tile_attention_install_remove(tiny):
    unet = tiny.unet
    before = dict(unet.attn_processors)
    set_cross_tile_attention(unet, 'mid')
    assert cross_tile_layers(unet) == ['mid_block.attentions.0.transformer_blocks.0.attn1']
    remove_cross_tile_attention(unet)
    assert all(unet.attn_processors[k] is v for k, v in before.items())
    with pytest.raises(ValueError, match='match no self-attention layer'): set_cross_tile_attention(unet, 'nowhere')


def test_bad_input_is_refused(tiny):
    with pytest.raises(ValueError, match='larger than the image'): make_grid(512, 512, 1024)
    for bad in (0, -8):
        with pytest.raises(ValueError, match='positive number of pixels'): make_grid(512, 512, bad)
        with pytest.raises(ValueError, match='positive number'): upscaled_size(64, 64, bad)
    with pytest.raises(ValueError, match='positive multiple of 8'): make_grid(-16, 512, 256)
    with pytest.raises(ValueError, match=r'\(0, 1\]'): UpscaleConfig(strength=0)
    with pytest.raises(ValueError, match='must be one of'): UpscaleConfig(seam_fix='diagonal')
    gen = SDXLGenerator.from_components(tiny, config=SamplerConfig(steps=4))
    with pytest.raises(ValueError, match='larger than the image'):
        tiled_upscale(gen, Image.new('RGB', (64, 64)), tile_width=512, progress=False)
    with pytest.raises(ValueError, match='unknown setting'): tiled_upscale(gen, Image.new('RGB', (64, 64)), tile_widht=64)
    with pytest.raises(ValueError, match='is not a USDU mode'): usdu_config(mode_type='Diagonal')


def test_cli_writes_pngs_with_all_parameters(tiny_folder, tmp_path, capsys):
    src = tmp_path / 'in.png'
    save_png(Image.new('RGB', (64, 64), (120, 30, 200)), src, {'prompt': 'red_circle', 'negative_prompt': 'lowres', 'steps': 28, 'seed': 1, 'sampler': 'euler'})
    rc = upscale_main([str(src), '--model', str(tiny_folder), '--out', str(tmp_path / 'up'), '--factor', '2', '--tile-width', '64',
                       '--padding', '16', '--steps', '4', '--seed', '9', '--order', 'linear', '--seam-fix', 'half_tile',
                       '--cross-tile-attention', 'all', '--quiet'])
    assert rc == 0, capsys.readouterr().err
    (png,) = sorted((tmp_path / 'up').glob('*.png'))
    assert png.name == 'in-x2-9.png'
    with Image.open(png) as im:
        assert im.size == (128, 128)
        meta, text = json.loads(im.info['ztsnr_nb']), im.info['parameters']
    assert (meta['prompt'], meta['negative_prompt'], meta['seed'], meta['upscale_order'], meta['upscale_seam_fix'],
            meta['upscale_cross_tile_attention'], meta['source_size']) == ('red_circle', 'lowres', 9, 'linear', 'half_tile', 'all', '64x64')
    assert 'Ultimate SD upscale tile_width: 64' in text and 'Denoising strength: 0.3' in text
    rc = upscale_main([str(src), '--model', str(tiny_folder), '--out', str(tmp_path / 'bad'), '--tile-width', '4096', '--quiet'])
    err = capsys.readouterr().err
    assert rc == 2 and 'larger than the image' in err and 'Traceback' not in err
    assert upscale_main([str(tmp_path / 'missing.png'), '--model', str(tiny_folder), '--quiet']) == 2
