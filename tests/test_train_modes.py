"""Training modes through the trainer: LoRA (CLI, exports that diffusers/ComfyUI read, exact resume, 2-process DDP),
post-hoc EMA across a resume, out-of-memory recovery, emergency checkpoints, model card / metadata / delta export /
hub push, adaptive optimizers, live tag weights, progressive resolution. Tiny model, CPU, each test well under 90 s."""
import json, os, shutil, subprocess, sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import run_cli, ROOT
from test_train import write_config, data_dir  # noqa: F401  (the synthetic dataset fixture)

from ztsnr_nb.training.config import (CheckpointConfig, DataConfig, EMAConfig, LogConfig, LoraSettings, OptimConfig,
                                      SamplerSettings, TagsConfig, TrainConfig, ValidationConfig, HubConfig,
                                      config_from_dict)


# ---------------------------------------------------------------- helpers: in-process tiny runs
def tiny_cfg(out, steps=6, **over):
    c = TrainConfig(seed=1)
    c.optim = OptimConfig(lr=1e-3, max_steps=steps, mixed_precision='no')
    c.checkpoint = CheckpointConfig(output_dir=str(out), every=3, keep_last=3, export=False)
    c.validation = ValidationConfig(every=0, width=64, height=64)
    c.sampler = SamplerSettings(steps=2)
    c.logging = LogConfig(log_with='none', progress=False)
    c.ema = EMAConfig(max_decay=0.9)
    for k, v in over.items(): setattr(c, k, v)
    return c


def run(out, steps=6, resume=None, hook=None, make_data=None, validate=False, **over):
    from accelerate import Accelerator
    from ztsnr_nb.models.sdxl import build_tiny_sdxl
    from ztsnr_nb.data.dataset import random_latent_data
    from ztsnr_nb.training.trainer import Trainer
    c = tiny_cfg(out, steps, **over); c.checkpoint.resume = resume
    m = build_tiny_sdxl(seed=0)
    d = make_data(m) if make_data is not None else random_latent_data(m, n=16, size=8, batch_size=4, seed=0, val_items=4)
    tr = Trainer(c, accelerator=Accelerator(cpu=True), models=m, data=d)
    if hook: hook(tr)
    if not validate: tr.validate = lambda: {}
    return tr, tr.fit()


def trained(tr):
    return {k: p.detach().clone() for k, p in tr.trained.items()}


def equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def drop_checkpoints(out, *steps):
    for s in steps: shutil.rmtree(Path(out) / 'checkpoints' / f'checkpoint-{s:08d}')


# ---------------------------------------------------------------- config
def test_tables_agree_and_print_config_round_trips(tmp_path):
    "The torch-free names of 00_policies equal the tables of the modules that run them; --print-config stays valid."
    from ztsnr_nb import policies as P
    from ztsnr_nb.models import lora
    from ztsnr_nb.training import device, posthoc_ema
    from ztsnr_nb import hub
    from ztsnr_nb.training.config import DeviceConfig
    import dataclasses, tomllib
    assert P.LORA_KINDS == lora.ADAPTER_KINDS and P.LORA_INITS == lora._INITS
    assert set(P.LORA_UNET_GROUPS) == set(lora.UNET_TARGETS) and set(P.LORA_TE_GROUPS) == set(lora.TE_TARGETS)
    assert P.POSTHOC_SIGMA_REL_MAX == posthoc_ema.SIGMA_REL_MAX and P.COMPILE_MODES == device.COMPILE_MODES
    assert P.ADAPTIVE_OPTIMIZER_PACKAGES == {k: v[0] for k, v in device.ADAPTIVE_OPTIMIZERS.items()}
    assert P.HUB_REPO_ID == hub._REPO_ID.pattern
    assert [f.name for f in dataclasses.fields(DeviceConfig)] == [f.name for f in dataclasses.fields(device.DeviceSettings)]
    cfg = TrainConfig(); cfg.device.compile_mode = 'max-autotune'
    assert device.DeviceSettings.coerce(cfg.device).compile_mode == 'max-autotune'   # the section is accepted as it is
    assert set(lora.LoraSpec.from_dict(LoraSettings(kind='loha', export_diffusers=False).spec_dict()).to_dict()) == \
        set(LoraSettings().spec_dict())
    r = run_cli('-m', 'ztsnr_nb.cli', '--print-config')
    assert r.returncode == 0, r.stderr
    back = config_from_dict(tomllib.loads(r.stdout), 'printed')
    assert back.lora.enabled is False and back.hub.base_model and back.ema.posthoc_sigma_rels == [0.05, 0.10]
    p = tmp_path / 'lora.toml'
    p.write_text('[model]\ntiny = true\n[lora]\nenabled = true\nkind = "lokr"\n')
    r = run_cli('-m', 'ztsnr_nb.cli', str(p), '--check')
    assert r.returncode == 2 and 'lora.export_diffusers = false' in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- LoRA through the CLI
LORA_TOML = '''[lora]
enabled = true
rank = 4
alpha = 8.0
text_encoder_targets = ["attn"]
export_merged = true
export_dtype = "fp32"
[hub]
base_model = "stabilityai/stable-diffusion-xl-base-1.0"
'''


@pytest.fixture(scope='module')
def lora_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp('lora') / 'run'
    cfg = write_config(out.parent / 'lora.toml', data_dir, out, steps=3, every=0, extra=LORA_TOML)
    r = run_cli('-m', 'ztsnr_nb.cli', str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _tiny_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.randn(2, 77, 80, generator=g),
            {'text_embeds': torch.randn(2, 48, generator=g), 'time_ids': torch.randn(2, 6, generator=g)})


def test_lora_cli_exports_load_in_diffusers_kohya_and_merged(lora_run, tiny_folder):
    from diffusers import StableDiffusionXLPipeline
    from ztsnr_nb.models.sdxl import build_tiny_sdxl
    from ztsnr_nb.models.lora import LoraSpec, add_adapters, load_kohya
    from ztsnr_nb.models.checkpoint import load_sdxl
    from ztsnr_nb.hub import split_front_matter
    exp = lora_run / 'export'
    assert {'pytorch_lora_weights.safetensors', 'lora.safetensors', 'merged.safetensors', 'README.md'} <= {p.name for p in exp.iterdir()}
    ck = sorted((lora_run / 'checkpoints').glob('checkpoint-*'))[-1]
    assert not list(ck.glob('model*.safetensors')) and (ck / 'state-adapters.safetensors').exists()   # adapters only
    manifest = json.loads((ck / 'trainer_state.json').read_text())['components']
    assert manifest['unet']['stored'] == 'adapters' and manifest['vae']['stored'] is None and manifest['vae']['digest']
    # kohya naming (what ComfyUI's LoraLoader and A1111 map) with modelspec metadata
    kohya = load_file(str(exp / 'lora.safetensors'))
    stems = {k.split('.')[0] for k in kohya}
    assert {s.split('_')[1] for s in stems} == {'unet', 'te1', 'te2'}
    assert all(f'{s}.alpha' in kohya and f'{s}.lora_down.weight' in kohya and f'{s}.lora_up.weight' in kohya for s in stems)
    with safe_open(str(exp / 'lora.safetensors'), 'pt') as f: md = f.metadata()
    assert md['modelspec.architecture'].endswith('/lora') and md['modelspec.prediction_type'] == 'v'
    assert md['ztsnr_nb.steps'] == '3' and json.loads(md['ztsnr_nb.config'])['lora']['rank'] == 4
    # our adapted model, from the kohya file, vs the diffusers pipeline with load_lora_weights of the diffusers export
    ours = build_tiny_sdxl(seed=0)
    add_adapters(ours, LoraSpec(rank=4, alpha=8.0, text_encoder_targets=('attn',)))
    assert load_kohya(exp / 'lora.safetensors', ours)['loaded'] == len(stems)
    pipe = build_tiny_sdxl(seed=0).pipeline()
    assert isinstance(pipe, StableDiffusionXLPipeline)
    pipe.load_lora_weights(str(exp))
    x, t, ctx, added = _tiny_inputs()
    ids = ours.tokenizer(['red_circle, white_background'], padding='max_length', max_length=77, return_tensors='pt').input_ids
    with torch.no_grad():
        a = ours.unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        b = pipe.unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        base = build_tiny_sdxl(seed=0).unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        te_a, te_b = ours.text_encoder(ids).last_hidden_state, pipe.text_encoder(ids).last_hidden_state
    assert (a - b).abs().max() < 1e-5 and (te_a - te_b).abs().max() < 1e-5
    assert (a - base).abs().max() > 1e-4                                   # the adapters did train
    # the merged single file (base + adapters) gives the same UNet output
    merged, _ = load_sdxl(exp / 'merged.safetensors', config_folder=tiny_folder)
    with torch.no_grad(): c = merged.unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
    assert (a - c).abs().max() < 1e-4
    # the model card: YAML parses, LoRA relation and section
    meta, body = split_front_matter((exp / 'README.md').read_text())
    assert meta['base_model_relation'] == 'adapter' and 'lora' in meta['tags'] and 'v-prediction' in meta['tags']
    assert 'LoraLoader' in body and 'load_lora_weights' in body


def test_lora_two_phase_resume_is_exact(tmp_path):
    lo = LoraSettings(enabled=True, rank=4, alpha=4.0, text_encoder_targets=['attn'])
    full, _ = run(tmp_path / 'full', steps=5, lora=lo)
    run(tmp_path / 'part', steps=3, lora=lo)                                # phase 1 ends (checkpoint at 3)
    part, s = run(tmp_path / 'part', steps=5, lora=lo, resume='latest')   # phase 2 continues
    assert s['resumed_from'].endswith('checkpoint-00000003')
    assert equal(trained(full), trained(part)) and equal(dict(zip(full.ema.names, full.ema.shadow)), dict(zip(part.ema.names, part.ema.shadow)))
    assert [r['loss'] for r in full.metrics()] == [r['loss'] for r in part.metrics()]


def test_lora_ddp_two_processes_stay_in_sync(tmp_path, data_dir):
    out = tmp_path / 'ddp'
    cfg = write_config(tmp_path / 'ddp.toml', data_dir, out, steps=3, every=2,
                       extra='[lora]\nenabled = true\nrank = 4\n')
    accel = shutil.which('accelerate') or str(Path(sys.executable).parent / 'accelerate')
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    r = subprocess.run([accel, 'launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1', '--mixed_precision', 'no',
                        '--dynamo_backend', 'no', '-m', 'ztsnr_nb.cli', str(cfg), '--set', 'checkpoint.export=false',
                        '--set', 'ema.posthoc=true', '--set', 'ema.posthoc_every=1'],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    s = json.loads((out / 'summary.json').read_text())
    assert s['num_processes'] == 2 and s['param_checksums'][0] == s['param_checksums'][1]
    assert len(list((out / 'posthoc_ema').glob('phema-*.safetensors'))) == 3 * 2      # main process only, every step


# ---------------------------------------------------------------- post-hoc EMA, OOM, emergency
def test_posthoc_snapshots_survive_resume(tmp_path):
    from ztsnr_nb.training.posthoc_ema import list_snapshots, reconstruct
    ema = EMAConfig(max_decay=0.9, posthoc=True, posthoc_every=2, posthoc_dtype='fp32')
    run(tmp_path / 'a', steps=6, ema=ema)
    run(tmp_path / 'b', steps=5, ema=ema)                 # snapshots at t = 2, 4; checkpoints at 3 and 5
    drop_checkpoints(tmp_path / 'b', 5)                   # as if killed after step 5, before its checkpoint
    _, s = run(tmp_path / 'b', steps=6, ema=ema, resume='latest')
    assert s['resumed_from'].endswith('checkpoint-00000003')
    sa, sb = list_snapshots(tmp_path / 'a' / 'posthoc_ema'), list_snapshots(tmp_path / 'b' / 'posthoc_ema')
    assert [(x.t, x.sigma_rel) for x in sa] == [(x.t, x.sigma_rel) for x in sb] == [(t, s) for t in (2, 4, 6) for s in (0.05, 0.1)]
    for x, y in zip(sa, sb): assert equal(load_file(str(x.path)), load_file(str(y.path)))
    ra, _ = reconstruct(tmp_path / 'a' / 'posthoc_ema', 0.07); rb, _ = reconstruct(tmp_path / 'b' / 'posthoc_ema', 0.07)
    assert equal(ra, rb) and all(k.startswith('unet.') for k in ra)


def _oom_when(limit, from_step):
    def hook(tr):
        orig = tr.micro_step
        def micro(batch):
            if tr.state.step >= from_step and len(batch['latents']) > limit:
                raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB (simulated)')
            return orig(batch)
        tr.micro_step = micro
    return hook


def test_simulated_oom_halves_micro_batch_mid_run(tmp_path):
    opt = OptimConfig(lr=1e-3, max_steps=5, mixed_precision='no', grad_accum=2)
    ref, _ = run(tmp_path / 'ref', steps=5, optim=opt)
    tr, s = run(tmp_path / 'oom', steps=5, optim=opt, hook=_oom_when(1, from_step=2))
    ev = s['micro_batch_events']
    assert [(e['bucket'], e['was'], e['micro_batch']) for e in ev] == [('8x8', 4, 2), ('8x8', 2, 1)]
    assert ev[-1]['accumulation'] == 8 and all(e['effective_batch'] == 8 for e in ev)      # A·B = 2·4 unchanged
    assert tr.oom.micro_batch('8x8') == 1
    w, r = trained(tr), trained(ref)
    assert max((w[k] - r[k]).abs().max().item() for k in w) < 1e-5                       # same samples, same noise
    ck = sorted((tmp_path / 'oom' / 'checkpoints').glob('checkpoint-*'))[-1]
    assert json.loads((ck / 'state-micro_batch.json').read_text())['state']['micro'] == {'8x8': 1}
    # the find-batch-size probe, with a simulated limit of 2, sets the bucket's micro-batch before training
    def probe_limit(tr):
        def try_micro(shape, n):
            if n > 2: raise torch.cuda.OutOfMemoryError('CUDA out of memory (simulated)')
        tr._try_micro = try_micro
    tr2, _ = run(tmp_path / 'probe', steps=1, hook=probe_limit, data=DataConfig(find_batch_size=True))
    assert tr2.oom.micro_batch('8x8') == 2 and not tr2.oom.events


def test_emergency_checkpoint_on_injected_exception_in_subprocess(tmp_path):
    "A RuntimeError at step 5 in a subprocess: a checkpoint of step 4 is written before it exits, and it resumes."
    out = tmp_path / 'boom'
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
              "from test_train_modes import run\n"
              "def boom(tr):\n"
              "    orig = tr.micro_step\n"
              "    def micro(batch):\n"
              "        if tr.state.step == 4: raise RuntimeError('injected failure')\n"
              "        return orig(batch)\n"
              "    tr.micro_step = micro\n"
              f"run({str(out)!r}, steps=6, hook=boom)\n")
    r = run_cli('-c', script, env={'OMP_NUM_THREADS': '1'})
    assert r.returncode == 1 and 'RuntimeError: injected failure' in r.stderr, r.stderr[-3000:]
    assert 'emergency checkpoint' in r.stderr and 'holds the state after step 4' in r.stderr
    cks = sorted((out / 'checkpoints').glob('checkpoint-*'))
    assert [c.name for c in cks] == ['checkpoint-00000003', 'checkpoint-00000004']      # every = 3, then the emergency one
    ts = json.loads((cks[-1] / 'trainer_state.json').read_text())
    assert ts['emergency'] == 'RuntimeError: injected failure' and ts['state']['step'] == 4
    resumed, s = run(out, steps=6, resume='latest')     # (that this resume is exact: 46_training_trainer's test)
    assert s['resumed_from'].endswith('checkpoint-00000004') and s['step'] == 6
    assert [r['step'] for r in resumed.metrics()] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------- metadata, card, delta, hub push
def test_full_export_metadata_card_delta_and_failed_push(tmp_path, monkeypatch):
    "Metadata read back from the export and trainer_state.json; card YAML; base + delta = export; a push failing mid-way."
    import huggingface_hub
    from ztsnr_nb.models.sdxl import build_tiny_sdxl
    from ztsnr_nb.models.checkpoint import load_sdxl
    from ztsnr_nb.hub import split_front_matter
    from ztsnr_nb.training.trainer import apply_delta, config_hash
    calls, token = [], 'hf_secret_token_for_the_test'
    def create_repo(self, repo_id, **kw): calls.append('create_repo'); return f'https://huggingface.co/{repo_id}'
    def create_commit(self, repo_id, operations, **kw):
        calls.append(f'create_commit {len(operations)} files'); raise ConnectionError('connection reset by peer (simulated)')
    monkeypatch.setattr(huggingface_hub.HfApi, 'create_repo', create_repo)       # intercepted at its public methods
    monkeypatch.setattr(huggingface_hub.HfApi, 'create_commit', create_commit)
    monkeypatch.setenv('HF_TOKEN', token)
    out = tmp_path / 'full'
    ck = CheckpointConfig(output_dir=str(out), every=2, keep_last=3, export=True, export_delta=True)
    hub = HubConfig(push=True, repo='me/tiny-vpred', base_model='stabilityai/stable-diffusion-xl-base-1.0', tags=['test'])
    tr, s = run(out, steps=3, checkpoint=ck, hub=hub, validate=True,
                validation=ValidationConfig(every=0, width=64, height=64, seeds=2, prompts=['red_circle']))
    # the push failed: logged, reported, the run still ended normally with its export; the token is nowhere
    assert calls[0] == 'create_repo' and calls[1].startswith('create_commit') and 'connection reset' in s['hub']['error']
    assert 'none of these files were published' in s['hub']['error']
    assert token not in (out / 'summary.json').read_text() and json.loads((out / 'summary.json').read_text())['hub'] == s['hub']
    meta, body = split_front_matter(Path(s['model_card']).read_text())
    assert meta['base_model'] == 'stabilityai/stable-diffusion-xl-base-1.0' and {'v-prediction', 'test'} <= set(meta['tags'])
    assert 'samples.png' in body and (out / 'export' / 'samples.png').exists()
    # metadata in the export header
    config = json.loads((out / 'config.json').read_text())
    with safe_open(str(out / 'export' / 'model.safetensors'), 'pt') as f: md = f.metadata()
    assert md['ztsnr_nb.config_hash'] == config_hash(config) and json.loads(md['ztsnr_nb.config']) == config
    assert md['ztsnr_nb.steps'] == '3' and md['ztsnr_nb.ema'] == 'True' and json.loads(md['ztsnr_nb.ema_settings'])['max_decay'] == 0.9
    assert json.loads(md['ztsnr_nb.base_model_hash']) == tr.base_digests and len(tr.base_digests) == 4
    assert md['ztsnr_nb.base_model'] == 'python' and md['ztsnr_nb.data_fingerprint'] not in ('', 'None') and md['modelspec.date']
    git = json.loads(md['ztsnr_nb.git'])
    if (ROOT / '.git').exists(): assert len(git['commit']) == 40 and isinstance(git['dirty'], bool)
    assert md['ztsnr_nb.version'] and md['modelspec.prediction_type'] == 'v'
    ts = json.loads((out / 'checkpoints' / 'checkpoint-00000003' / 'trainer_state.json').read_text())
    assert ts['metadata']['config_hash'] == config_hash(config) and ts['metadata']['step'] == 3
    assert ts['components']['unet']['stored'] == 'model' and ts['components']['text_encoder']['stored'] is None
    # delta export: base + delta = the exported (EMA) UNet
    base = build_tiny_sdxl(seed=0)
    names = apply_delta(base, out / 'export' / 'delta.safetensors', tr.base_digests)
    assert names and all(n.startswith('unet.') for n in names)
    exported, _ = load_sdxl(out / 'export' / 'diffusers')
    a, b = base.unet.state_dict(), exported.unet.state_dict()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-6
    with pytest.raises(ValueError, match='a delta against other'):
        apply_delta(build_tiny_sdxl(seed=0), out / 'export' / 'delta.safetensors', {**tr.base_digests, 'unet': '0' * 32})


# ---------------------------------------------------------------- adaptive optimizers
@pytest.mark.parametrize('name', ['prodigy', 'schedulefree_adamw'])
def test_adaptive_optimizer_runs_and_resumes(tmp_path, name):
    pytest.importorskip({'prodigy': 'prodigyopt', 'schedulefree_adamw': 'schedulefree'}[name])
    from ztsnr_nb.models.sdxl import build_tiny_sdxl
    o = OptimConfig(optimizer=name, lr=1.0 if name == 'prodigy' else 1e-3, lr_scheduler='constant', max_steps=3, mixed_precision='no')
    tr, s = run(tmp_path, steps=3, optim=o, ema=EMAConfig(enabled=False))
    assert type(tr.opt.optimizer).__name__ == {'prodigy': 'Prodigy', 'schedulefree_adamw': 'AdamWScheduleFree'}[name]
    assert all(r['loss'] == r['loss'] for r in tr.metrics()) and s['nonfinite_total'] == 0
    init = {f'unet.{k}': v for k, v in build_tiny_sdxl(seed=0).unet.named_parameters()}
    w = trained(tr)
    assert any(not torch.equal(w[k], init[k]) for k in w)
    if name == 'schedulefree_adamw':        # evaluation (and export) with the averaged weights, training weights after
        with tr._eval_weights(use_ema=False): ev = trained(tr)
        diff = lambda a, b: max((a[k] - b[k]).abs().max().item() for k in a)
        assert diff(ev, w) > 1e-4 and diff(trained(tr), w) < 1e-6     # (back to y up to rounding)
    o2 = OptimConfig(**{**o.to_dict(), 'max_steps': 4})
    tr2, s2 = run(tmp_path, steps=4, optim=o2, ema=EMAConfig(enabled=False), resume='latest')
    assert s2['step'] == 4 and s2['resumed_from'].endswith('checkpoint-00000003')


# ---------------------------------------------------------------- live tag weights
def _tagged_data(m):
    "random_latent_data with batch['index'] and a dataset.tag_weighting over its captions (what the dataset will expose)."
    from types import SimpleNamespace
    from torch.utils.data import DataLoader
    from ztsnr_nb.data.dataset import random_latent_data
    from ztsnr_nb.data.tags import TagWeighting, tag_statistics
    d = random_latent_data(m, n=16, size=8, batch_size=4, seed=0, val_items=4)
    caps = [f"{'red' if i % 2 else 'blue'}_circle, {'white' if i % 3 else 'black'}_background" for i in range(16)]
    st, pc = tag_statistics(caps, cooc=False)
    d.dataset = SimpleNamespace(tag_weighting=TagWeighting(st, pc, TagsConfig(enabled=True, implied=False)))
    orig = d._collate
    d.loader = DataLoader(range(12), batch_sampler=d.sampler, collate_fn=lambda idx: {**orig(idx), 'index': list(idx)})
    return d


def test_live_tag_tracker_observes_steps_and_resumes(tmp_path):
    tags = TagsConfig(enabled=True, live=True, live_every=2, live_min_obs=1, live_rate=0.5, implied=False)
    a, _ = run(tmp_path / 'a', steps=6, tags=tags, make_data=_tagged_data)
    tt = a.tag_tracker
    assert tt is not None and tt.updates == 3 and (tt.mult != 1).any()
    assert (a.data.dataset.tag_weighting.multipliers == tt.mult).all()       # the tracker moved the weighting
    assert (tmp_path / 'a' / 'checkpoints' / 'checkpoint-00000003' / 'state-tag_tracker.json').exists()
    run(tmp_path / 'b', steps=5, tags=tags, make_data=_tagged_data)
    drop_checkpoints(tmp_path / 'b', 5)                                      # resume from 3: mid-window (updates at 2, 4, 6)
    b, _ = run(tmp_path / 'b', steps=6, tags=tags, make_data=_tagged_data, resume='latest')
    assert b.tag_tracker.state_dict() == tt.state_dict() and equal(trained(a), trained(b))


# ---------------------------------------------------------------- progressive resolution
def test_progressive_resolution_switch_resumes_exactly(tmp_path):
    from ztsnr_nb.data.dataset import random_latent_data
    def make(m):   # the data function of one stage: latents of the stage's max_area (8x8 latents, then 12x12)
        return lambda d: random_latent_data(m, n=16, size=int(d.max_area ** 0.5) // 8, batch_size=4, seed=0, val_items=4)
    dc = DataConfig(max_area=64 * 64, min_side=32, max_side=128, bucket_step=32, resolution_schedule=[[3, 96 * 96]])
    ck = lambda out: CheckpointConfig(output_dir=str(out), every=2, keep_last=3, export=False)
    a, _ = run(tmp_path / 'a', steps=6, data=dc, make_data=make, checkpoint=ck(tmp_path / 'a'))
    assert a.stage == 1 and a.data.val_batches[0]['latents'].shape[-1] == 12
    run(tmp_path / 'b', steps=6, data=dc, make_data=make, checkpoint=ck(tmp_path / 'b'))
    shutil.copytree(tmp_path / 'b', tmp_path / 'c')
    drop_checkpoints(tmp_path / 'b', 4, 6)                                   # resume before the switch (step 2)
    drop_checkpoints(tmp_path / 'c', 6)                                      # resume after it (step 4)
    for d in ('b', 'c'):
        r, s = run(tmp_path / d, steps=6, data=dc, make_data=make, checkpoint=ck(tmp_path / d), resume='latest')
        assert r.stage == 1 and equal(trained(r), trained(a)), d
        assert [x['loss'] for x in r.metrics()] == [x['loss'] for x in a.metrics()]


def test_lora_run_pushes_its_adapter_files(tmp_path, monkeypatch):
    "A LoRA export (no diffusers pipeline folder) is pushed as its .safetensors files + card (HfApi intercepted)."
    import huggingface_hub
    commits = []
    monkeypatch.setattr(huggingface_hub.HfApi, 'create_repo', lambda self, repo_id, **kw: f'https://huggingface.co/{repo_id}')
    def create_commit(self, repo_id, operations, **kw):
        commits.append(sorted(op.path_in_repo for op in operations))
        return type('Info', (), {'commit_url': f'https://huggingface.co/{repo_id}/commit/0'})()
    monkeypatch.setattr(huggingface_hub.HfApi, 'create_commit', create_commit)
    monkeypatch.setenv('HF_TOKEN', 'hf_not_a_real_token')
    out = tmp_path / 'lora'
    tr, s = run(out, steps=2, lora=LoraSettings(enabled=True, rank=2, alpha=2.0), hub=HubConfig(push=True, repo='me/tiny-lora'),
                checkpoint=CheckpointConfig(output_dir=str(out), every=0, export=True))
    assert 'error' not in s['hub'], s['hub']
    assert commits == [['README.md', 'lora.safetensors', 'pytorch_lora_weights.safetensors', 'training_config.json']]
    assert sorted(s['hub']['files']) == commits[0] and s['hub']['repo_id'] == 'me/tiny-lora'
