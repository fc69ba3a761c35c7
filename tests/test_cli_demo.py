"The embedded demo as a user runs it: `ztsnr_nb_train` with no config (here with fewer steps)."
import json, re
from pathlib import Path

from conftest import run_cli


def test_demo_runs_and_writes_everything(tmp_path):
    out = tmp_path / "demo"
    r = run_cli("-m", "ztsnr_nb.cli", "--demo", "--demo-steps", "12", "--output-dir", str(out), timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert str(out) in r.stdout and "mean brightness" in r.stdout
    assert re.search(r"black_background, [a-z_, ]*dark: [+-]\d\.\d\d  \(target -0\.94\)", r.stdout)
    run = out / "run"
    s = json.loads((run / "summary.json").read_text())
    assert s["step"] == 12 and s["stopped_by"] is None
    assert list((run / "checkpoints").glob("checkpoint-*"))
    assert (run / "export" / "model.safetensors").exists() and (run / "export" / "diffusers" / "model_index.json").exists()
    assert (run / "loss.png").stat().st_size > 1000
    assert list((run / "samples").glob("step-*.png"))
    assert list((run / "logs").rglob("events.out.tfevents.*")), "TensorBoard logs missing"
    assert len(list((out / "data").glob("*.txt"))) == 160
