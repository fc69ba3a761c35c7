"Process-level tests of the decoder-only VAE fine-tune (`ztsnr_nb_vae`, 48_training_vae_finetune): a CLI run with export and merge, SIGTERM + exact resume, bad input."
import json, os, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli

MOD = "ztsnr_nb.training.vae_finetune"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from ztsnr_nb.data.synthetic import make_synthetic_dataset
    d = tmp_path_factory.mktemp("vae_data") / "synthetic"
    make_synthetic_dataset(d, n=12, seed=0, min_side=64, max_side=128)
    return d


@pytest.fixture(scope="module")
def single_file(tiny_folder, tmp_path_factory):
    "A tiny SDXL single file with v_pred/ztsnr markers and metadata (its VAE is the one fine-tuned)."
    from ztsnr_nb.models.checkpoint import load_sdxl, save_single_file
    comps, _ = load_sdxl(tiny_folder)
    return save_single_file(tmp_path_factory.mktemp("sdxl") / "tiny.safetensors", comps, prediction="v", ztsnr=True,
                            metadata={"note": "base"})


def write_config(path: Path, data: Path, out: Path, vae: str, steps=4, every=0, extra_vae="", extra=""):
    path.write_text(f'''seed = 5
[vae]
{vae}
crop_size = 32
gan_start = 2
disc_channels = 8
disc_levels = 2
feature_match_weight = 0.5
style_weight = 0.5
jpeg_quality = 30
jpeg_prob = 0.5
grid_images = 1
{extra_vae}
[data]
source = "{data}"
max_area = 4096
bucket_step = 32
min_side = 32
max_side = 128
batch_size = 2
val_items = 1
[optim]
lr = 1e-4
max_steps = {steps}
mixed_precision = "no"
[ema]
max_decay = 0.9
[checkpoint]
output_dir = "{out}"
every = {every}
keep_last = 2
[logging]
log_with = "none"
progress = false
{extra}''')
    return path


def metrics(out: Path):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]


def last_checkpoint(out: Path) -> Path:
    return sorted((out / "checkpoints").glob("checkpoint-*"))[-1]


def test_cli_run_exports_vae_folder_and_merged_single_file(tmp_path, data_dir, single_file, tiny_folder):
    "Fine-tune the single file's own VAE, export an fp16-safe AutoencoderKL folder and a merged single file that loads both ways."
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from ztsnr_nb.models.checkpoint import load_sdxl, read_state_dict
    from ztsnr_nb.models.vae import decoder_state_dict, encoder_state_dict
    out = tmp_path / "run"
    vae = f'pretrained = "{single_file}"\nconfig_folder = "{tiny_folder}"\nmerge_into = "{single_file}"'
    r = run_cli("-m", MOD, str(write_config(tmp_path / "run.toml", data_dir, out, vae, steps=3)))
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["step"] == 3 and s["encoder_unchanged"] and s["export"]["encoder_unchanged"]
    assert s["export"]["fp16"]["applied"] and s["export"]["fp16"]["fp32_max_diff"] <= 1e-3
    rep = json.loads((out / "eval" / "report.json").read_text())
    assert set(rep["before"]) >= {"clean", "jpeg"} and set(rep["after"]["jpeg"]) >= {"l1", "psnr", "ssim", "perceptual", "blockiness"}
    assert (out / "eval" / "grid.png").stat().st_size > 500
    orig, _ = load_sdxl(tiny_folder)
    new = AutoencoderKL.from_pretrained(out / "export" / "vae", local_files_only=True)
    enc0, enc1 = encoder_state_dict(orig.vae), encoder_state_dict(new)
    assert enc0.keys() == enc1.keys() and all(torch.equal(enc0[k], enc1[k]) for k in enc0)      # latents stay valid
    dec_new = decoder_state_dict(new)
    assert any(not torch.equal(v, decoder_state_dict(orig.vae)[k]) for k, v in dec_new.items())
    merged = Path(s["export"]["single_file"])
    _, md0, _, _ = read_state_dict(single_file)
    sd1, md1, _, _ = read_state_dict(merged)
    assert {"v_pred", "ztsnr"} <= set(sd1) and {k: v for k, v in md1.items() if k != "ztsnr_nb.vae"} == md0
    comps, lrep = load_sdxl(merged, config_folder=tiny_folder)
    assert (lrep.prediction_type, lrep.ztsnr) == ("v", True)
    for k, v in decoder_state_dict(comps.vae).items(): assert torch.equal(v, dec_new[k].to(v.dtype)), k
    pipe = StableDiffusionXLPipeline.from_single_file(str(merged), config=str(tiny_folder), local_files_only=True)
    for k, v in decoder_state_dict(pipe.vae).items(): assert torch.equal(v, dec_new[k].to(v.dtype)), k


def test_sigterm_checkpoints_and_resume_is_exact(tmp_path, data_dir):
    "SIGTERM: exit 143 with a checkpoint; --resume latest finishes with exactly the weights and losses of an uninterrupted run."
    from ztsnr_nb.training.vae_finetune import vae_main
    vae = "tiny = true\ndemo_weights = false"
    full = tmp_path / "full"                                         # the reference, uninterrupted (in this process: quicker)
    assert vae_main([str(write_config(tmp_path / "full.toml", data_dir, full, vae, steps=6)), "--set", "checkpoint.export=false"]) == 0
    part = tmp_path / "part"
    cfg = write_config(tmp_path / "part.toml", data_dir, part, vae, steps=6, extra="")
    p = subprocess.Popen([sys.executable, "-m", MOD, str(cfg), "--set", "checkpoint.export=false"],
                         env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(torch.get_num_threads())),   # same float sums as the reference
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if (part / "metrics.jsonl").exists() and len(metrics(part)) >= 2: break
        time.sleep(0.02)
    assert p.poll() is None, "the run finished before it could be stopped"
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=300)[1]
    assert p.returncode == 143, err[-2000:]
    ck = last_checkpoint(part)
    stopped_at = json.loads((ck / "trainer_state.json").read_text())["state"]["step"]
    assert 2 <= stopped_at < 6 and not (part / "summary.json").read_text().count('"evaluation"')
    assert vae_main([str(cfg), "--resume", "latest", "--set", "checkpoint.export=false"]) == 0
    s = json.loads((part / "summary.json").read_text())
    assert s["resumed_from"] is not None and s["step"] == 6
    assert [m["loss"] for m in metrics(part)] == [m["loss"] for m in metrics(full)]
    for f in ("model.safetensors", "model_1.safetensors"):            # decoder side, discriminator
        a, b = load_file(str(last_checkpoint(full) / f)), load_file(str(last_checkpoint(part) / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_bad_input_gives_one_line_errors(tmp_path, data_dir, capsys):
    "Another VAE architecture, LPIPS without its weights, images smaller than the crop, a typo: exit 2, one clear line."
    from diffusers import AutoencoderKL
    from ztsnr_nb.training.vae_finetune import vae_main
    flux = tmp_path / "flux_vae"
    AutoencoderKL(latent_channels=16, block_out_channels=(16,) * 4, norm_num_groups=8, layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4).save_pretrained(flux)
    out = tmp_path / "bad"
    cfg = write_config(tmp_path / "bad.toml", data_dir, out, f'pretrained = "{flux}"')
    r = run_cli("-m", MOD, str(cfg))                                  # one real process: the message is one line, no traceback
    assert r.returncode == 2 and "another architecture" in r.stderr and "latent_channels=16" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    tiny = write_config(tmp_path / "tiny.toml", data_dir, out, "tiny = true\ndemo_weights = false")
    cases = [(["--set", 'vae.perceptual="lpips"'], "nothing is downloaded"),
             (["--set", 'vae.perceptual="lpips"', "--set", f'vae.lpips_backbone="{tmp_path}/vgg16-397923af.pth"',
               "--set", f'vae.lpips_heads="{tmp_path}/vgg.pth"'], "vgg16-397923af.pth'"),
             (["--set", "vae.crop_size=96", "--set", "data.min_side=96", "--set", "data.max_area=16384"], "smaller than vae.crop_size = 96"),
             (["--set", "vae.crop_sise=64"], "did you mean 'vae.crop_size'"),
             (["--set", "vae.crop_size=60"], "vae.crop_size = 60: must be a multiple of 8")]
    for extra, want in cases:
        assert vae_main([str(tiny), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert want in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert vae_main([str(tiny), "--check"]) == 0 and "config OK" in capsys.readouterr().out
