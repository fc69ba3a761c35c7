"Process-level and round-trip tests of ztsnr_nb.models.checkpoint (fast: tiny models and meta-device SDXL)."
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ztsnr_nb.models import checkpoint as ck
from ztsnr_nb.models.sdxl import TinySDXLConfig, build_real_sdxl_on_meta, build_tiny_sdxl

torch.set_num_threads(1)
COMPONENTS = ('unet', 'vae', 'text_encoder', 'text_encoder_2')


@pytest.fixture(scope='module')
def tiny():
    # text encoders of different widths: diffusers' from_single_file would otherwise load TE1 into TE2 (see notebook)
    return build_tiny_sdxl(seed=3, config=TinySDXLConfig(te2_hidden=48))


@pytest.fixture(scope='module')
def saved(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp('ckpt')
    cfg = ck.save_diffusers(d / 'cfg', tiny)
    f = ck.save_single_file(d / 'model.safetensors', tiny, metadata={'steps': 7})
    return d, cfg, f


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items() if not k.endswith('position_ids')}


def test_meta_sdxl_round_trip_and_diffusers_key_set():
    from diffusers.loaders import single_file_utils as sfu
    real = build_real_sdxl_on_meta()
    sds = {k: getattr(real, k).state_dict() for k in COMPONENTS}
    single = ck.diffusers_to_sdxl_keys(*(sds[k] for k in COMPONENTS))
    for name, got in zip(COMPONENTS, ck.sdxl_to_diffusers_keys(single)):
        assert _shapes(got) == _shapes(sds[name]), name
    assert sfu.infer_diffusers_model_type(single) == 'xl_base'
    assert _shapes(sfu.convert_ldm_unet_checkpoint(single, dict(real.unet.config))) == _shapes(sds['unet'])
    assert _shapes(sfu.convert_ldm_vae_checkpoint(single, dict(real.vae.config))) == _shapes(sds['vae'])
    assert _shapes(sfu.convert_open_clip_checkpoint(real.text_encoder_2, single, prefix=ck.TE2_PREFIX)) == _shapes(sds['text_encoder_2'])
    assert all(k.startswith((ck.UNET_PREFIX, ck.VAE_PREFIX, ck.TE1_PREFIX, ck.TE2_PREFIX)) for k in single)


def test_tiny_values_round_trip(tiny):
    sds = [getattr(tiny, k).state_dict() for k in COMPONENTS]
    back = ck.sdxl_to_diffusers_keys(ck.diffusers_to_sdxl_keys(*sds))
    for a, b in zip(sds, back):
        assert set(b) == {k for k in a if not k.endswith('position_ids')}
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_markers_and_metadata(saved):
    _, _, f = saved
    with safe_open(f, 'pt') as s:
        keys, md = set(s.keys()), s.metadata()
        assert s.get_tensor('v_pred').numel() == 0 and s.get_tensor('ztsnr').numel() == 0
    assert {'v_pred', 'ztsnr'} <= keys
    assert md['modelspec.prediction_type'] == 'v' and md['modelspec.architecture'] == 'stable-diffusion-xl-v1-base'
    assert md['ztsnr_nb.steps'] == '7' and md['modelspec.sai_model_spec'] == '1.0.0'


def _sample(pipe):
    return pipe("red_circle, blue_background", num_inference_steps=2, height=64, width=64, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type='np').images


def test_diffusers_from_single_file_and_load_sdxl_give_same_images(tiny, saved):
    from diffusers import StableDiffusionXLPipeline
    _, cfg, f = saved
    ref = _sample(tiny.pipeline())
    theirs = StableDiffusionXLPipeline.from_single_file(str(f), config=str(cfg), local_files_only=True)
    comps, rep = ck.load_sdxl(f, cfg)
    assert rep.prediction_type == 'v' and rep.ztsnr and {'v_pred', 'ztsnr'} <= set(rep.markers_found)
    assert abs(_sample(theirs) - ref).max() < 1e-5
    assert abs(_sample(comps.pipeline()) - ref).max() < 1e-6


def test_unmarked_file_loads_as_epsilon_unless_told(saved):
    d, cfg, f = saved
    g = d / 'unmarked.safetensors'
    save_file({k: v for k, v in load_file(f).items() if k not in ck.MARKERS}, g)
    comps, rep = ck.load_sdxl(g, cfg)
    assert (rep.prediction_type, rep.ztsnr) == ('epsilon', False)
    assert comps.scheduler.config.prediction_type == 'epsilon'
    assert any("no 'v_pred' marker" in n for n in rep.notes) and 'epsilon' in repr(rep)
    comps, rep = ck.load_sdxl(g, cfg, prediction='v')
    assert rep.prediction_type == 'v' and comps.scheduler.config.prediction_type == 'v_prediction'


def test_bad_inputs_name_the_file(saved, tmp_path):
    _, cfg, f = saved
    cut = tmp_path / 'cut.safetensors'
    cut.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ck.CheckpointError, match='cut.safetensors'): ck.load_sdxl(cut, cfg)
    txt = tmp_path / 'notes.safetensors'
    txt.write_text('hello world, not tensors')
    with pytest.raises(ck.CheckpointError, match='notes.safetensors.*not a safetensors'): ck.load_sdxl(txt, cfg)
    sd15 = tmp_path / 'sd15.safetensors'
    save_file({'model.diffusion_model.input_blocks.0.0.weight': torch.zeros(1),
               'cond_stage_model.transformer.text_model.final_layer_norm.weight': torch.zeros(1)}, sd15)
    with pytest.raises(ck.CheckpointError, match='sd15.safetensors: this is an SD1.x checkpoint, ztsnr_nb loads SDXL'):
        ck.load_sdxl(sd15, cfg)
    with pytest.raises(ck.CheckpointError, match='config_folder='): ck.load_sdxl(f)
    with pytest.raises(ck.CheckpointError, match='lacks unet/config.json'): ck.load_sdxl(f, tmp_path)
    torch.save(load_file(f), tmp_path / 'm.ckpt')
    with pytest.raises(ck.CheckpointError, match='allow_pickle=True'): ck.load_sdxl(tmp_path / 'm.ckpt', cfg)
    assert ck.load_sdxl(tmp_path / 'm.ckpt', cfg, allow_pickle=True)[1].prediction_type == 'v'


WRITER = textwrap.dedent('''
    import os, signal, sys
    from pathlib import Path
    from ztsnr_nb.models import checkpoint as ck
    from ztsnr_nb.models.sdxl import build_tiny_sdxl, TinySDXLConfig
    def die_half_way(tensors, path, metadata):
        Path(path).write_bytes(b'half a checkpoint')
        os.kill(os.getpid(), signal.SIGKILL)
    ck._write_safetensors = die_half_way
    ck.save_single_file(sys.argv[1], build_tiny_sdxl(seed=4, config=TinySDXLConfig(te2_hidden=48)))
''')


def test_killed_writer_leaves_previous_checkpoint_intact(saved, tmp_path):
    "Fault injection: a writer process SIGKILLed mid-write must not replace or damage the existing file."
    _, cfg, f = saved
    target = tmp_path / 'model.safetensors'
    target.write_bytes(f.read_bytes())
    before = target.read_bytes()
    r = subprocess.run([sys.executable, '-c', WRITER, str(target)], capture_output=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    assert target.read_bytes() == before
    assert ck.load_sdxl(target, cfg)[1].prediction_type == 'v'
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != 'model.safetensors']
    assert all(n.startswith('.model.safetensors.') and n.endswith('.tmp') for n in leftovers)  # only a hidden temp file


def test_save_diffusers_scheduler_markers(tiny, tmp_path):
    d = ck.save_diffusers(tmp_path / 'out', tiny)
    sc = json.loads((d / 'scheduler' / 'scheduler_config.json').read_text())
    assert (sc['prediction_type'], sc['rescale_betas_zero_snr'], sc['timestep_spacing']) == ('v_prediction', True, 'trailing')
    comps, rep = ck.load_sdxl(d)
    assert (rep.format, rep.prediction_type, rep.ztsnr) == ('diffusers', 'v', True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]
