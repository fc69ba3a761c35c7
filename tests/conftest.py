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
