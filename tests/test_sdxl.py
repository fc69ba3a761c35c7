"Foundation tests as a user would run them: the tiny SDXL factory, its console script, diffusers loading."
import shutil

import torch
from diffusers import StableDiffusionXLPipeline

from conftest import run_cli, run_script
from ztsnr_nb.models.sdxl import build_tiny_sdxl, load_tokenizer, tokenize, TinySDXLConfig, build_unet


def test_pipeline_loads_saved_folder_and_generates(tiny_folder):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_folder, local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    out = pipe("red_circle, blue_background", num_inference_steps=2, height=64, width=64,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3) and (out >= 0).all() and (out <= 1).all()


def test_tokenizers_give_real_ids_and_pad_to_77(tiny_folder):
    tok = load_tokenizer(tiny_folder / "tokenizer")
    ids = tok("red_circle, blue_background, monochrome, black_background").input_ids
    assert len(ids) > 6 and len(set(ids) - {tok.bos_token_id, tok.eos_token_id}) >= 5
    assert tok.model_max_length == 77
    batch = tokenize(tok, ["solid_color", ", ".join(["white_background"] * 60)])
    assert batch.shape == (2, 77)


def test_console_script_writes_folder(tmp_path):
    r = run_script("ztsnr_nb_make_tiny", tmp_path / "t", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "t" / "model_index.json").exists() and (tmp_path / "t" / "unet" / "config.json").exists()


def test_console_script_rejects_unwritable_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_script("ztsnr_nb_make_tiny", blocker / "sub")
    assert r.returncode == 2 and "folder" in r.stderr and "Traceback" not in r.stderr


def test_seed_determinism_and_bad_config():
    a = build_tiny_sdxl(seed=5).unet.state_dict()
    b = build_tiny_sdxl(seed=5).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    import pytest
    with pytest.raises(ValueError, match="sample_size"):
        TinySDXLConfig(sample_size=0)
    with pytest.raises(ValueError, match="seed"):
        build_unet(TinySDXLConfig(), seed=-3)
