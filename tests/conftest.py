import os, sys, subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def script(name: str) -> str:
    "The installed console script `name` next to this interpreter (what `pip install` puts on the PATH)."
    return str(Path(sys.executable).parent / name)


def run_script(name, *args, timeout=600, env=None, **kw):
    "Run an installed console script as a user would, capturing output."
    e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([script(name), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=e, **kw)


def run_cli(*args, timeout=600, env=None, **kw):
    "Run a console entry point as a user would (`python -m module ...`), capturing output."
    e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=e, **kw)


def write_tiny_run_config(path: Path, data: Path, out: Path, *, steps: int, every: int, cache: Path | None = None,
                          keep_last: int = 2, export: bool = True, validation: str = "", sampler_steps: int = 2,
                          extra: str = "") -> Path:
    "The TOML of a tiny-model run on `data` into `out` (cache next to it unless `cache`), small validation; `extra` appended."
    path.write_text(f'''seed = 3
[model]
tiny = true
[data]
source = "{data}"
cache_dir = "{cache or out.parent / (out.name + '_cache')}"
max_area = 4096
bucket_step = 32
min_side = 32
max_side = 128
batch_size = 2
val_items = 2
[optim]
lr = 1e-3
max_steps = {steps}
mixed_precision = "no"
[ema]
max_decay = 0.9
[checkpoint]
output_dir = "{out}"
every = {every}
keep_last = {keep_last}
{'' if export else 'export = false' + chr(10)}[validation]
prompts = ["solid_color, black_background, dark"]
{validation}width = 64
height = 64
[sampler]
steps = {sampler_steps}
[logging]
log_with = "none"
progress = false
{extra}''')
    return path


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    "A tiny SDXL diffusers folder, saved once per test session."
    from ztsnr_nb.models.sdxl import save_tiny_sdxl
    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny") / "tiny_sdxl", seed=0)


def pytest_terminal_summary(terminalreporter):
    "The fault-injection table of tests/test_faults.py, when it ran (issue 11)."
    fu = sys.modules.get("faults_util")
    if fu is not None and fu.RESULTS:
        terminalreporter.section("fault injection: kinds tried / survived / data lost")
        for line in fu.table().splitlines(): terminalreporter.write_line(line)
