"Process-level tests of `ztsnr_nb_train`: config errors, exact resume after SIGKILL, SIGTERM, 2-process DDP."
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, ROOT, write_tiny_run_config

STEPS = 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from ztsnr_nb.data.synthetic import make_synthetic_dataset
    d = tmp_path_factory.mktemp("data") / "synthetic"
    make_synthetic_dataset(d, n=24, seed=0, min_side=64, max_side=160)
    return d


def write_config(path: Path, data: Path, out: Path, steps=STEPS, every=2, extra=""):
    return write_tiny_run_config(path, data, out, steps=steps, every=every, extra=extra)


def final_unet(out: Path):
    ck = sorted((out / "checkpoints").glob("checkpoint-*"))[-1]
    return load_file(str(ck / "model.safetensors"))


def losses(out: Path):
    return [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]


def test_config_errors_exit_2_one_line(tmp_path, data_dir):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlrr = 1e-4\n")
    r = run_cli("-m", "ztsnr_nb.cli", str(bad))
    assert r.returncode == 2 and "did you mean 'optim.lr'" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("-m", "ztsnr_nb.cli", "--data", str(data_dir), "--set", "optim.max_steps=-3")
    assert r.returncode == 2 and "optim.max_steps" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("-m", "ztsnr_nb.cli", "--data", str(tmp_path / "nope"), "--set", "model.tiny=true")
    assert r.returncode == 2 and "data.source" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("-m", "ztsnr_nb.cli", "--data", str(data_dir))            # no model: an error, never a random tiny model
    assert r.returncode == 2 and "model.tiny = true" in r.stderr


def test_train_export_and_exact_resume_after_sigkill(tmp_path, data_dir):
    full = tmp_path / "full"
    r = run_cli("-m", "ztsnr_nb.cli", str(write_config(tmp_path / "full.toml", data_dir, full)))
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((full / "summary.json").read_text())
    assert s["step"] == STEPS and s["num_processes"] == 1
    # export: single file with ComfyUI/A1111 markers, diffusers folder
    from safetensors import safe_open
    with safe_open(str(full / "export" / "model.safetensors"), "pt") as f:
        assert {"v_pred", "ztsnr"} <= set(f.keys())
        assert f.metadata()["modelspec.prediction_type"] == "v"
    assert (full / "export" / "diffusers" / "model_index.json").exists()
    assert (full / "loss.png").stat().st_size > 1000

    # the same run, killed with SIGKILL after step 5 was logged, then resumed
    part = tmp_path / "part"
    cfg = write_config(tmp_path / "part.toml", data_dir, part)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "ztsnr_nb.cli", str(cfg)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if (part / "metrics.jsonl").exists() and len(losses(part)) >= 5: break
        time.sleep(0.05)
    assert p.poll() is None, "the run finished before it could be killed"
    p.send_signal(signal.SIGKILL); p.wait()
    assert not (part / "export").exists()
    r = run_cli("-m", "ztsnr_nb.cli", str(cfg), "--resume", "latest")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((part / "summary.json").read_text())
    assert s["resumed_from"] is not None and s["step"] == STEPS
    assert losses(part) == losses(full)
    a, b = final_unet(full), final_unet(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_leaves_loadable_checkpoint(tmp_path, data_dir):
    out = tmp_path / "term"
    cfg = write_config(tmp_path / "term.toml", data_dir, out, steps=200, every=100)
    p = subprocess.Popen([sys.executable, "-m", "ztsnr_nb.cli", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if (out / "metrics.jsonl").exists() and len(losses(out)) >= 3: break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=300)[1]
    assert p.returncode == 143, err[-2000:]
    ck = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert len(ck) == 1 and not ck[0].name.endswith(".tmp")
    state = json.loads((ck[0] / "trainer_state.json").read_text())["state"]
    assert state["step"] >= 3
    sd = load_file(str(ck[0] / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in sd.values())
    # and it resumes (to a shorter end, to keep the test quick)
    r = run_cli("-m", "ztsnr_nb.cli", str(cfg), "--resume", "latest", "--max-steps", str(state["step"] + 2),
                "--set", "checkpoint.export=false")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["step"] == state["step"] + 2


def test_two_process_ddp_keeps_weights_in_sync(tmp_path, data_dir):
    out = tmp_path / "ddp"
    cfg = write_config(tmp_path / "ddp.toml", data_dir, out, steps=4, every=0, extra="")
    accel = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    r = subprocess.run([accel, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ztsnr_nb.cli", str(cfg),
                        "--set", "checkpoint.export=false"],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["num_processes"] == 2
    c = s["param_checksums"]
    assert len(c) == 2 and c[0] == c[1]


def test_text_encoder_training_changes_both_encoders(tmp_path, data_dir):
    "With model.train_text_encoder the text comes from token ids every step and both encoders are updated and exported."
    out = tmp_path / "te"
    cfg = write_config(tmp_path / "te.toml", data_dir, out, steps=3, every=0)
    r = run_cli("-m", "ztsnr_nb.cli", str(cfg), "--set", "model.train_text_encoder=true", "--set", "optim.text_encoder_lr=1e-2")
    assert r.returncode == 0, r.stderr[-3000:]
    from ztsnr_nb.models.checkpoint import load_sdxl
    from ztsnr_nb.models.sdxl import build_tiny_sdxl
    comps, _ = load_sdxl(out / "export" / "diffusers")
    init = build_tiny_sdxl(seed=0)
    for k in ("text_encoder", "text_encoder_2"):
        a, b = getattr(comps, k).state_dict(), getattr(init, k).state_dict()
        assert any(not torch.equal(a[n], b[n]) for n in a if n in b), f"{k} did not change"
