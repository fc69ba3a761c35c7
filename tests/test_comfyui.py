"""ztsnr_nb.comfyui: node logic directly, the adapter and the nodes on a faithful ComfyUI stand-in (tests/comfy_standin.py),
loading as ComfyUI loads custom nodes, and (when COMFYUI_PATH points at a ComfyUI checkout) against the real ComfyUI."""
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ztsnr_nb.comfyui as pkg
from ztsnr_nb.comfyui import core

sys.path.insert(0, str(Path(__file__).parent))
import comfy_standin  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def standin():
    comfy_standin.install()
    from ztsnr_nb.comfyui import adapter
    yield adapter
    comfy_standin.uninstall()


def test_node_logic_returns_documented_types():
    tab = core.ztsnr_sigma_table('comfyui')
    assert tab.shape == (1000,) and tab.dtype == torch.float32 and bool((tab[1:] > tab[:-1]).all())
    assert abs(tab[-1].item() - 4518.76) < 0.01
    for denoise in (1.0, 0.3):
        s = core.resolution_sigmas(20, 1216, 832, denoise=denoise)
        assert s.ndim == 1 and s.dtype == torch.float32 and s[-1].item() == 0.0 and bool((s[1:] < s[:-1]).all())
    assert abs(core.resolution_sigmas(25, 2048, 2048, ztsnr=False, terminal_sigma=14.6146)[0].item() - 29.23) < 0.01
    x = torch.randn(1, 4, 8, 8)
    args = {'cond': torch.randn(1, 4, 8, 8), 'uncond': torch.randn(1, 4, 8, 8), 'cond_scale': 5.0, 'sigma': torch.tensor([1.5]), 'input': x}
    out = core.rescale_cfg(args, 0.7)
    assert out.shape == x.shape and out.dtype == x.dtype
    img = torch.rand(2, 16, 8, 3)
    assert core.pil_to_image(core.image_to_pil(img)).shape == (2, 16, 8, 3)
    c = core.with_size_conditioning([[torch.zeros(1, 77, 2048), {'pooled_output': torch.zeros(1, 1280)}]], [1536, 2048, 64, 128, 896, 1152])
    assert {k: c[0][1][k] for k in ('height', 'width', 'crop_h', 'crop_w', 'target_height', 'target_width')} == \
        dict(height=1536, width=2048, crop_h=64, crop_w=128, target_height=896, target_width=1152)


def test_non_sdxl_models_are_refused(standin):
    for kind in ('SD15', 'SDXLRefiner', 'Flux'):
        with pytest.raises(ValueError, match='needs an SDXL model'):
            pkg.ZTSNRModelSampling().patch(comfy_standin.oracle_model_patcher(kind=kind), 'comfyui')
    with pytest.raises(ValueError, match="differ from SDXL's schedule"):
        standin.patch_ztsnr(comfy_standin.oracle_model_patcher(linear_end=0.02), 4518.76)
    with pytest.raises(ValueError, match='expected a ComfyUI MODEL'): standin.model_sampling_info('not a model')


def test_nodes_on_the_standin(standin):
    def run(name, **inputs):
        cls = pkg.NODE_CLASS_MAPPINGS[name]
        out = getattr(cls(), cls.FUNCTION)(**inputs)
        assert isinstance(out, tuple) and len(out) == len(cls.RETURN_TYPES)
        return out
    mp = comfy_standin.oracle_model_patcher()
    (m2,) = run('ZTSNRModelSampling', model=mp, terminal_sigma='custom', custom_sigma=8000.0)
    ms = m2.get_model_object('model_sampling')
    assert isinstance(ms, comfy_standin.V_PREDICTION) and ms.zsnr and abs(float(ms.sigma_max) - 8000.0) < 0.1
    assert not getattr(mp.get_model_object('model_sampling'), 'zsnr')            # the input is not modified
    (sig,) = run('ZTSNRResolutionSigmas', model=m2, steps=10, width=1024, height=768, denoise=0.5, spacing='trailing', sigma_max='auto')
    assert sig.ndim == 1 and sig.dtype == torch.float32 and sig[-1] == 0 and len(sig) == 6
    (m3,) = run('ZTSNRCFGRescale', model=m2, multiplier=0.7)
    assert 'sampler_cfg_function' in m3.model_options and 'sampler_cfg_function' not in m2.model_options
    comfy_standin.SEEN_CONDS.clear()
    (img,) = run('ZTSNRTiledUpscale', image=torch.full((1, 64, 96, 3), 0.3), model=m3, positive=comfy_standin.conditioning(),
                 negative=comfy_standin.conditioning(), vae=comfy_standin.SolidVAE(), upscale_by=2.0, seed=0, steps=28, cfg=5.0,
                 denoise=0.3, tile_width=64, tile_height=64, mask_blur=8, tile_padding=16, mode_type='Chess', seam_fix_mode='None',
                 seam_fix_denoise=0.25, seam_fix_width=64, seam_fix_mask_blur=8, seam_fix_padding=16, noise_rule='canvas')
    assert img.shape == (1, 128, 192, 3) and img.dtype == torch.float32
    for y in (0, 64):
        for x in (0, 64, 128): assert abs(img[0, y:y + 64, x:x + 64].mean().item() - 0.3) < 0.02
    crops = {(d['crop_h'], d['crop_w']) for d in comfy_standin.SEEN_CONDS}
    assert crops == {(0, 0), (0, 48), (0, 96), (32, 0), (32, 48), (32, 96)}
    assert {(d['height'], d['width'], d['target_height'], d['target_width']) for d in comfy_standin.SEEN_CONDS} == {(128, 192, 96, 96)}


def test_package_loads_like_a_comfyui_custom_node(tmp_path):
    custom = tmp_path / 'custom_nodes'
    custom.mkdir()
    os.symlink(Path(pkg.__file__).parent, custom / 'ztsnr_link')
    for folder in (custom / 'ztsnr_link', pkg.write_loader(custom, 'ztsnr_loader').parent):
        name = str(folder).replace('.', '_x_')
        spec = importlib.util.spec_from_file_location(name, folder / '__init__.py')
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        assert sorted(mod.NODE_CLASS_MAPPINGS) == ['ZTSNRCFGRescale', 'ZTSNRModelSampling', 'ZTSNRResolutionSigmas', 'ZTSNRTiledUpscale']
        assert set(mod.NODE_DISPLAY_NAME_MAPPINGS) == set(mod.NODE_CLASS_MAPPINGS)
        for cls in mod.NODE_CLASS_MAPPINGS.values():
            assert isinstance(cls.INPUT_TYPES()['required'], dict) and isinstance(cls.RETURN_TYPES, tuple) and hasattr(cls, cls.FUNCTION)
    r = subprocess.run([sys.executable, '-c', 'import sys, ztsnr_nb.comfyui; print("comfy" in sys.modules)'], capture_output=True, text=True)
    assert r.stdout.strip() == 'False', r.stderr


REAL = r'''
import sys, torch
from ztsnr_nb.comfyui import adapter, core
import ztsnr_nb.comfyui as pkg
import ztsnr_nb.inference.upscale
if TORCHVISION_STUB: install_torchvision_stub()
sys.path.insert(0, COMFYUI_PATH)
argv, sys.argv = sys.argv, [sys.argv[0]] + ([] if torch.cuda.is_available() else ['--cpu'])
import comfy.options; comfy.options.enable_args_parsing()
import comfy.model_sampling, comfy.samplers, comfy.model_patcher, comfy.supported_models as sm, comfy.model_base as mb
sys.argv = argv
# the zsnr table: ours vs ComfyUI's own
ref = comfy.model_sampling.ModelSamplingDiscrete(None, zsnr=True)
assert ((core.ztsnr_sigma_table('comfyui') - ref.sigmas).abs() / ref.sigmas).max() < 1e-5
# a tiny real SDXL model (comfy.model_base.SDXL) in a real ModelPatcher
unet = dict(model_channels=32, use_linear_in_transformer=True, transformer_depth=[0, 1], context_dim=2048, adm_in_channels=2816,
            use_temporal_attention=False, in_channels=4, out_channels=4, num_res_blocks=[1, 1], channel_mult=[1, 2],
            transformer_depth_middle=1, num_head_channels=16, image_size=32, use_spatial_transformer=True, legacy=False,
            transformer_depth_output=[0, 0, 1, 1], num_classes='sequential')
model = mb.SDXL(sm.SDXL(unet), device=torch.device('cpu'))
torch.manual_seed(0)
with torch.no_grad():
    for p in model.parameters(): p.normal_(0, 0.02)       # comfy.ops leaves weights uninitialised
mp = comfy.model_patcher.ModelPatcher(model, load_device=torch.device('cpu'), offload_device=torch.device('cpu'))
(m2,) = pkg.ZTSNRModelSampling().patch(mp, 'comfyui')
ms = m2.get_model_object('model_sampling')
assert isinstance(ms, comfy.model_sampling.V_PREDICTION) and ms.zsnr and abs(float(ms.sigma_max) - 4518.76) < 0.01
assert adapter.model_sampling_info(mp)['prediction'] == 'epsilon'
(m3,) = pkg.ZTSNRCFGRescale().patch(m2, 0.7)
x, sig = torch.randn(2, 4, 8, 8) * 3, torch.tensor([2.0, 0.5])
cd, ud = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
ours = comfy.samplers.cfg_function(None, cd, ud, 5.0, x, sig, model_options=m3.model_options)
try:
    import comfy_extras.nodes_model_advanced as na
except ImportError as e:
    print('skipped RescaleCFG comparison:', e)
else:
    (m4,) = na.RescaleCFG().patch(m2, 0.7)
    theirs = comfy.samplers.cfg_function(None, cd, ud, 5.0, x, sig, model_options=m4.model_options)
    assert (ours - theirs).abs().max() < 1e-4, (ours - theirs).abs().max()
(sig,) = pkg.ZTSNRResolutionSigmas().get_sigmas(m3, 28, 1024, 1024)
assert sig.dtype == torch.float32 and sig[-1] == 0 and abs(sig[0].item() - 4518.76) < 0.01
class VAE:                       # comfy.sd.VAE's encode/decode surface
    def encode(self, px): return torch.nn.functional.avg_pool2d(px.permute(0, 3, 1, 2), 8).repeat(1, 2, 1, 1)[:, :4] * 4 - 2
    def decode(self, z): return ((torch.nn.functional.interpolate(z[:, :3], scale_factor=8) + 2) / 4).clamp(0, 1).permute(0, 2, 3, 1)
cond = [[torch.randn(1, 77, 2048) * 0.1, {'pooled_output': torch.randn(1, 1280) * 0.1}]]
(out,) = pkg.ZTSNRTiledUpscale().upscale(torch.rand(1, 64, 64, 3), m3, cond, cond, VAE(), upscale_by=2.0, seed=0, steps=8, cfg=4.0,
                                         denoise=0.5, tile_width=64, tile_height=64, mask_blur=8, tile_padding=16, mode_type='Chess',
                                         seam_fix_mode='Band Pass', seam_fix_denoise=0.3, seam_fix_width=32, seam_fix_mask_blur=8,
                                         seam_fix_padding=16, noise_rule='canvas')
assert out.shape == (1, 128, 128, 3) and torch.isfinite(out).all()
# loaded by ComfyUI's own custom-node loader, from a symlink and from the generated loader folder
import asyncio, os, tempfile, pathlib, nodes
custom = pathlib.Path(tempfile.mkdtemp()) / 'custom_nodes'; custom.mkdir()
os.symlink(pathlib.Path(pkg.__file__).parent, custom / 'ztsnr_link')
for folder in (custom / 'ztsnr_link', pkg.write_loader(custom, 'ztsnr_loader').parent):
    for k in list(pkg.NODE_CLASS_MAPPINGS): nodes.NODE_CLASS_MAPPINGS.pop(k, None)
    assert asyncio.run(nodes.load_custom_node(str(folder))), folder
    assert set(pkg.NODE_CLASS_MAPPINGS) <= set(nodes.NODE_CLASS_MAPPINGS) and set(pkg.NODE_CLASS_MAPPINGS) <= set(nodes.NODE_DISPLAY_NAME_MAPPINGS)
print('REAL COMFYUI OK')
'''


# COMFYUI_TORCHVISION_STUB=1: for machines where torchvision cannot load beside torch (this project's CPU machine:
# `torchvision::nms does not exist`). ComfyUI's model zoo imports torchvision at module level (cosmos, cascade, ace);
# the SDXL path our nodes drive never calls it. The stub goes in after our own imports, so diffusers/transformers
# still see no torchvision, and any call into it raises.
STUB = r'''
import types
def install_torchvision_stub():
    def _absent(*a, **k): raise RuntimeError('torchvision stub (COMFYUI_TORCHVISION_STUB=1): torchvision is not available')
    for name in ('torchvision', 'torchvision.transforms', 'torchvision.ops'):
        m = types.ModuleType(name); m.__getattr__ = lambda n, _f=_absent: _f; sys.modules[name] = m
    sys.modules['torchvision'].transforms, sys.modules['torchvision'].ops = sys.modules['torchvision.transforms'], sys.modules['torchvision.ops']
'''


@pytest.mark.skipif(not os.environ.get('COMFYUI_PATH'), reason='set COMFYUI_PATH to a ComfyUI checkout to test against real ComfyUI')
def test_against_real_comfyui():
    stub = os.environ.get('COMFYUI_TORCHVISION_STUB') == '1'
    code = (f'import sys\nCOMFYUI_PATH = {os.environ["COMFYUI_PATH"]!r}\nTORCHVISION_STUB = {stub}\n' + textwrap.dedent(STUB)
            + textwrap.dedent(REAL))
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode == 0 and 'REAL COMFYUI OK' in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
