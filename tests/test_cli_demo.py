"The embedded demo as a user runs it: `ztsnr_nb_train` with no config (shortened: fewer steps and samples)."
import json
from pathlib import Path

from conftest import run_script


def test_short_demo_runs_and_writes_everything(tmp_path):
    out = tmp_path / "demo"
    r = run_script("ztsnr_nb_train", "--max-steps", "6", "--demo-samples", "2", "--output-dir", out, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    # the printed summary: both models' numbers, where the side-by-side is, what to do next
    for s in ("ZTSNR, CFG 1", "ZTSNR, CFG 5", "SDXL schedule, CFG 1", "SDXL schedule, CFG 5", "side-by-side picture",
              str(out / "side_by_side.png"), "--print-config", "ztsnr_nb_generate"):
        assert s in r.stdout, (s, r.stdout[-3000:])
    s = json.loads((out / "summary.json").read_text())
    assert set(s["brightness"]) == {"ZTSNR", "SDXL schedule"} and s["steps"] == 6
    for label in s["brightness"]:
        for c in ("cfg 1", "cfg 5"):
            assert set(s["brightness"][label][c]) == {"dark", "bright"}
            assert s["brightness"][label][c]["dark"]["n"] == 2
    assert (out / "side_by_side.png").stat().st_size > 1000
    for run in ("run-ztsnr", "run-sdxl"):
        d = out / run
        assert (d / "config.json").exists()
        rs = json.loads((d / "summary.json").read_text())
        mb = rs["validation"]["mean_brightness"]
        assert len(mb) == 4 and all(isinstance(v, float) for v in mb.values())      # 4 prompts, seed-averaged
        assert rs["step"] == 6 and rs["stopped_by"] is None
        assert list((d / "checkpoints").glob("checkpoint-*")) and (d / "loss.png").stat().st_size > 1000
        assert (d / "export" / "model.safetensors").exists() and (d / "export" / "diffusers" / "model_index.json").exists()
        assert list((d / "logs").rglob("events.out.tfevents.*")), "TensorBoard logs missing"
    sched = json.loads((out / "run-sdxl" / "export" / "diffusers" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["timestep_spacing"] == "trailing"          # the spacing validation sampled with, for the non-ZTSNR model too
    assert len(list((out / "data").glob("*.txt"))) == 160


def test_flags_without_config_apply_to_the_demo_or_are_refused(tmp_path):
    r = run_script("ztsnr_nb_train", "--resume", "latest", timeout=120)
    assert r.returncode == 2 and "need a CONFIG" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_script("ztsnr_nb_train", "--max-steps", "0", timeout=120)
    assert r.returncode == 2 and "--max-steps 0" in r.stderr
