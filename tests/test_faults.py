"""Fault injection (issue 11): SIGINT/SIGKILL at random points of caching, training and saving with exact-resume
comparison; damaged and NaN checkpoints; malicious pickles through every loader; full disks; 50+ bad configs;
hostile data. Bounded in time (each test < 60-120 s); `pytest -s tests/test_faults.py` or the terminal summary
prints the table: kinds tried / survived / data lost. ZTSNR_FAULT_SEED picks other random kill points."""
import json, os, pickle, random, re, shutil, signal, sqlite3, subprocess, sys, textwrap, time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cli, write_tiny_run_config
from faults_util import record, table

SEED = int(os.environ.get("ZTSNR_FAULT_SEED", "0"))
STEPS = 4
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


# ---------------------------------------------------------------------------------------------------------- helpers
def write_config(path: Path, data: Path, out: Path, steps=STEPS, every=1, extra=""):
    return write_tiny_run_config(path, data, out, steps=steps, every=every, export=False, sampler_steps=1, extra=extra)


def cli(cfg, *args):
    return subprocess.Popen([sys.executable, "-m", "ztsnr_nb.cli", str(cfg), *map(str, args)], env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def losses(out: Path):
    f = out / "metrics.jsonl"
    return [json.loads(l)["loss"] for l in f.read_text().splitlines() if l.strip()] if f.exists() else []


def final_weights(out: Path):
    from safetensors.torch import load_file
    ck = sorted((out / "checkpoints").glob("checkpoint-*[0-9]"))[-1]
    return load_file(str(ck / "model.safetensors"))


def one_line_error(stderr: str) -> bool:
    "No traceback, and the last line is the CLI's one-line message."
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    return "Traceback" not in stderr and bool(lines) and lines[-1].startswith("ztsnr_nb_train: ")


def wait_for(cond, proc, timeout=240, poll=0.002):
    "Poll `cond()` until true (True), the process ends (False) or the timeout passes (assertion)."
    t0 = time.time()
    while proc.poll() is None:
        if cond(): return True
        assert time.time() - t0 < timeout, "no progress"
        time.sleep(poll)
    return False


class Payload:
    "Unpickling this would create a file: the test that it never exists is the test that no code ran."
    path = None
    def __reduce__(self): return (os.system, (f"touch {self.path}",))


def _must(x):
    "x, or CheckpointError when it is None (a loader that found nothing usable refused)."
    from ztsnr_nb.training.checkpointing import CheckpointError
    if x is None: raise CheckpointError("nothing usable")
    return x


def payload_bytes(flag: Path) -> bytes:
    Payload.path = flag
    return pickle.dumps(Payload())


# ---------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    "16 good synthetic images plus the bad-input corpus (broken files, odd entries, a 2.4 MB caption) in one kohya folder."
    from ztsnr_nb.data.synthetic import make_synthetic_dataset
    from ztsnr_nb.data.sources import make_broken_corpus, make_odd_entries
    d = tmp_path_factory.mktemp("data") / "mixed"
    recs = make_synthetic_dataset(d, n=16, seed=0, min_side=64, max_side=160)
    make_broken_corpus(d / "1_broken")
    make_odd_entries(d / "1_odd", recs[0].png.read_bytes())
    (d / "long.png").write_bytes(recs[1].png.read_bytes()); (d / "long.txt").write_text("red_circle, " * 200_000)
    return d


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    "An uninterrupted run over the mixed folder: what every interrupted one must reproduce exactly."
    out = tmp_path_factory.mktemp("ref") / "ref"
    r = run_cli("-m", "ztsnr_nb.cli", str(write_config(out.parent / "ref.toml", data_dir, out)), env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(losses(out)) == STEPS
    return out


# ---------------------------------------------------------------------------------------------------------- kills
def test_interrupts_at_random_points_then_exact_resume(tmp_path, data_dir, reference):
    "SIGINT and SIGKILL while caching, SIGKILL while training and while a checkpoint is written; the resumed run equals the reference."
    rng = random.Random(SEED)
    out = tmp_path / "faulted"
    cfg = write_config(tmp_path / "faulted.toml", data_dir, out)
    index = out.parent / "faulted_cache" / "latents" / "index.sqlite"
    ckdir = out / "checkpoints"

    # 1. SIGINT once caching has started: a clean exit (130, one line), the cache consistent
    p = cli(cfg, "--resume", "latest")
    started = wait_for(index.exists, p)
    time.sleep(rng.uniform(0, 0.3)); p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    in_cache = not (out / "metrics.jsonl").exists()                   # the signal came before training started
    ok = started and p.returncode == 130 and "Traceback" not in err and (one_line_error(err) or not in_cache)
    record("SIGINT during caching" if in_cache else "SIGINT during training", ok); assert ok, (p.returncode, err[-2000:])
    from ztsnr_nb.data.latent_cache import LatentCache
    c = LatentCache(index.parent)
    assert all(torch.isfinite(c.get(k).mean.float()).all() for k in c.keys())      # every committed item readable

    # 2. SIGKILL at a random moment of the (resumed) caching or first steps
    p = cli(cfg, "--resume", "latest")
    wait_for(index.exists, p); time.sleep(rng.uniform(0, 1.0)); p.kill(); p.wait()
    record("SIGKILL during caching/startup", p.returncode == -9)

    # 3. SIGKILL after a random number of logged steps (before or after a checkpoint)
    k, t_start = rng.randint(1, STEPS - 1), time.time()
    p = cli(cfg, "--resume", "latest")
    mf = out / "metrics.jsonl"
    hit = wait_for(lambda: mf.exists() and mf.stat().st_mtime > t_start and len(losses(out)) >= k, p)
    p.kill(); p.wait()
    record("SIGKILL during training", hit and p.returncode == -9)

    # 4. SIGKILL while a checkpoint folder is being written (checkpoint-*.tmp exists)
    p = cli(cfg, "--resume", "latest")
    hit = wait_for(lambda: ckdir.is_dir() and any(x.suffix == ".tmp" for x in ckdir.iterdir()), p)
    p.kill(); p.wait()
    if hit:
        from ztsnr_nb.training.checkpointing import resolve_resume
        good = resolve_resume("latest", out)          # the half-written folder is never taken for a checkpoint
        record("SIGKILL during checkpoint save", good is None or not good.name.endswith(".tmp"))

    # 5. finish: the run must equal the uninterrupted reference, loss by loss and weight by weight
    p = cli(cfg, "--resume", "latest")
    outp, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    same_losses = losses(out) == losses(reference)
    a, b = final_weights(reference), final_weights(out)
    same_weights = a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    record("exact resume after all interrupts", same_losses and same_weights, lost=0 if same_weights else 1)
    assert same_losses, (losses(out), losses(reference))
    assert same_weights
    assert outp.count('"param_checksums"') == 1                                      # the summary, printed once


def test_second_run_on_a_busy_cache_fails_with_the_pid(tmp_path, data_dir):
    "Another process holds rank 0 of the cache: the run exits 1 with one line naming that PID (no traceback)."
    from ztsnr_nb.data.latent_cache import LatentCache
    out = tmp_path / "busy"
    cfg = write_config(tmp_path / "busy.toml", data_dir, out)
    lc = LatentCache(out.parent / "busy_cache" / "latents")
    with lc._rank_lock(0):
        r = run_cli("-m", "ztsnr_nb.cli", str(cfg), env={"OMP_NUM_THREADS": "1"}, timeout=300)
    ok = r.returncode == 1 and one_line_error(r.stderr) and f"PID {os.getpid()}" in r.stderr
    record("two runs on one cache folder", ok)
    assert ok, (r.returncode, r.stderr[-2000:])


# ---------------------------------------------------------------------------------------------------------- checkpoints
def _tiny_run(seed=0):
    from accelerate import Accelerator
    from ztsnr_nb.models.sdxl import TinySDXLConfig, build_unet
    from ztsnr_nb.training.checkpointing import TrainState
    acc = Accelerator(cpu=True)
    unet = build_unet(TinySDXLConfig(), seed=seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    unet, opt = acc.prepare(unet, opt)
    for p_ in unet.parameters(): p_.grad = torch.full_like(p_, 1e-3)
    opt.step(); sched.step(); opt.zero_grad()
    return acc, unet, opt, sched, TrainState()


def _save(acc, unet, opt, sched, st, out, step):
    from ztsnr_nb.training.checkpointing import save_checkpoint
    st.step = step
    return save_checkpoint(acc, out, st, {}, keep_last=5, models={"model": unet}, optimizer=opt,
                           objects={"lr_scheduler": sched, "train_state": st})


DAMAGE = {
    "truncated model.safetensors": lambda ck: (ck / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes()[:1000]),
    "truncated optimizer.safetensors": lambda ck: (ck / "optimizer.safetensors").write_bytes((ck / "optimizer.safetensors").read_bytes()[:-7]),
    "flipped byte in weights": lambda ck: _flip(ck / "model.safetensors"),
    "deleted optimizer.json": lambda ck: (ck / "optimizer.json").unlink(),
    "garbage manifest": lambda ck: (ck / "manifest.json").write_text("{not json"),
    "NaN weights, valid manifest": lambda ck: _nan(ck),
    "emptied trainer_state.json": lambda ck: (ck / "trainer_state.json").write_text(""),
}


def _flip(f: Path):
    b = bytearray(f.read_bytes()); b[len(b) // 2] ^= 0x55; f.write_bytes(bytes(b))


def _nan(ck: Path):
    from safetensors.torch import load_file, save_file
    from ztsnr_nb.training.checkpointing import write_manifest
    sd = load_file(str(ck / "model.safetensors")); k = next(iter(sd)); sd[k] = sd[k].clone(); sd[k].view(-1)[0] = float("nan")
    save_file(sd, str(ck / "model.safetensors")); write_manifest(ck)


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back(tmp_path, kind):
    "The newest checkpoint damaged one way: resume 'latest' skips it (saying why) and loads the previous one exactly."
    from ztsnr_nb.training.checkpointing import resume_checkpoint
    acc, unet, opt, sched, st = _tiny_run()
    out = tmp_path / "run"
    ck1 = _save(acc, unet, opt, sched, st, out, 1)
    saved = {k: v.clone() for k, v in acc.unwrap_model(unet).state_dict().items()}
    with torch.no_grad():
        for p_ in unet.parameters(): p_.add_(1.0)
    ck2 = _save(acc, unet, opt, sched, st, out, 2)
    DAMAGE[kind](ck2)
    acc2, unet2, opt2, sched2, st2 = _tiny_run(seed=1)
    got, ts = resume_checkpoint(acc2, "latest", out, {"lr_scheduler": sched2, "train_state": st2}, models={"model": unet2}, optimizer=opt2)
    loaded = acc2.unwrap_model(unet2).state_dict()
    ok = got == ck1 and st2.step == 1 and all(torch.equal(saved[k], loaded[k]) for k in saved)
    record(f"damaged newest checkpoint: {kind}", ok, lost=0 if ok else 1)
    assert ok, (got, st2)


def test_nonfinite_weights_are_never_written_or_exported(tmp_path):
    "NaN weights: save_checkpoint, save_single_file and save_diffusers refuse; the good checkpoint stays the newest."
    from ztsnr_nb.models.checkpoint import NonFiniteWeightsError, save_diffusers, save_single_file
    from ztsnr_nb.models.sdxl import build_tiny_sdxl
    from ztsnr_nb.training.checkpointing import latest_checkpoint, list_checkpoints
    acc, unet, opt, sched, st = _tiny_run()
    out = tmp_path / "run"
    ck1 = _save(acc, unet, opt, sched, st, out, 1)
    with torch.no_grad(): next(iter(unet.parameters())).view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match=re.escape(ck1.name)): _save(acc, unet, opt, sched, st, out, 2)
    ok = list_checkpoints(out) == [ck1] and latest_checkpoint(out) == ck1 and not list((out / "checkpoints").glob("*.tmp"))
    record("NaN weights: checkpoint refused", ok); assert ok
    comps = build_tiny_sdxl(seed=0)
    with torch.no_grad(): comps.unet.conv_in.weight.view(-1)[0] = float("nan")
    for name, fn in (("single file", lambda: save_single_file(tmp_path / "x.safetensors", comps)),
                     ("diffusers folder", lambda: save_diffusers(tmp_path / "diff", comps))):
        with pytest.raises(NonFiniteWeightsError): fn()
        ok = not (tmp_path / "x.safetensors").exists() and not (tmp_path / "diff").exists()
        record(f"NaN weights: export refused ({name})", ok); assert ok


# ---------------------------------------------------------------------------------------------------------- pickles
def test_malicious_pickle_never_runs_through_any_loader(tmp_path):
    "A payload that would create a file, planted where each of our loaders looks: refused (or weights_only), never run."
    from ztsnr_nb.models.checkpoint import CheckpointError as ModelCheckpointError, load_sdxl, read_state_dict, save_diffusers
    from ztsnr_nb.models.sdxl import build_tiny_sdxl
    from ztsnr_nb.training.checkpointing import (CheckpointError, UnsafeCheckpointError, _weights_only, latest_checkpoint,
                                                  load_checkpoint, resolve_resume, verify_checkpoint)
    flag = tmp_path / "PWNED"
    evil = payload_bytes(flag)
    acc, unet, opt, sched, st = _tiny_run()
    ck = _save(acc, unet, opt, sched, st, tmp_path / "run", 1)
    (ck / "custom_checkpoint_0.pkl").write_bytes(evil)
    legacy = tmp_path / "legacy" / "checkpoints" / "checkpoint-00000003"; legacy.mkdir(parents=True)
    (legacy / "trainer_state.json").write_text('{"state": {"step": 3}}'); (legacy / "optimizer.bin").write_bytes(evil)
    torch.save({"w": Payload()}, tmp_path / "evil_torch_zip.pt")
    loaders = {
        "load_checkpoint (explicit objects)": lambda: load_checkpoint(acc, ck, {"lr_scheduler": sched, "train_state": st},
                                                                     models={"model": unet}, optimizer=opt),
        "load_checkpoint (registered objects)": lambda: load_checkpoint(acc, ck),
        "load_checkpoint (legacy accelerate folder)": lambda: load_checkpoint(acc, legacy),
        "resolve_resume('latest')": lambda: resolve_resume("latest", tmp_path / "legacy"),
        "verify_checkpoint": lambda: verify_checkpoint(ck),
        "latest_checkpoint": lambda: _must(latest_checkpoint(tmp_path / "run")),
    }
    for ext in (".ckpt", ".pt", ".bin", ".pth"):
        (tmp_path / f"model{ext}").write_bytes(evil)
        loaders[f"read_state_dict({ext})"] = lambda ext=ext: read_state_dict(tmp_path / f"model{ext}")
        loaders[f"read_state_dict({ext}, allow_pickle=True)"] = lambda ext=ext: read_state_dict(tmp_path / f"model{ext}", allow_pickle=True)
        loaders[f"load_sdxl({ext})"] = lambda ext=ext: load_sdxl(tmp_path / f"model{ext}")
    (tmp_path / "pickle_named.safetensors").write_bytes(evil)
    loaders["read_state_dict(pickle named .safetensors)"] = lambda: read_state_dict(tmp_path / "pickle_named.safetensors")
    folder = save_diffusers(tmp_path / "diffusers", build_tiny_sdxl(seed=0))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes((tmp_path / "evil_torch_zip.pt").read_bytes())
    loaders["load_sdxl(diffusers folder with a .bin)"] = lambda: load_sdxl(folder)
    loaders["load_sdxl(diffusers folder, allow_pickle=True)"] = lambda: load_sdxl(folder, allow_pickle=True)
    def engine_load():
        with _weights_only(True): torch.load(tmp_path / "evil_torch_zip.pt", weights_only=False)
    loaders["engine shards (forced weights_only)"] = engine_load
    for name, load in loaders.items():
        try: load(); refused = False
        except (CheckpointError, ModelCheckpointError, pickle.UnpicklingError, OSError, ValueError, RuntimeError): refused = True
        ok = refused and not flag.exists()
        record(f"malicious pickle: {name}", ok)
        assert ok, f"{name}: refused={refused}, payload ran={flag.exists()}"
    with pytest.raises(UnsafeCheckpointError, match="custom_checkpoint_0.pkl"): load_checkpoint(acc, ck)


def test_resume_refuses_a_planted_pickle_through_the_cli(tmp_path, data_dir, reference):
    "`ztsnr_nb_train --resume latest` on a run whose checkpoints hold a payload: exit 2, one line, the payload never runs."
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    flag = tmp_path / "PWNED"
    for ck in (out / "checkpoints").glob("checkpoint-*"): (ck / "custom_checkpoint_1.pkl").write_bytes(payload_bytes(flag))
    cfg = write_config(tmp_path / "evil.toml", data_dir, out, steps=STEPS + 1)
    shutil.copytree(reference.parent / "ref_cache", out.parent / "run_cache")
    r = run_cli("-m", "ztsnr_nb.cli", str(cfg), "--resume", "latest", env={"OMP_NUM_THREADS": "1"}, timeout=300)
    ok = r.returncode == 2 and one_line_error(r.stderr) and "--trust-checkpoint" in r.stderr and not flag.exists()
    record("malicious pickle: CLI --resume latest", ok)
    assert ok, (r.returncode, r.stderr[-2000:])


# ---------------------------------------------------------------------------------------------------------- disks
CHILD_FULL = textwrap.dedent('''
    import json, os, resource, signal, sys, torch
    from pathlib import Path
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # writes past the limit fail with EFBIG instead of killing us
    sys.path.insert(0, sys.argv[2])
    from test_faults import _tiny_run, _save
    from ztsnr_nb.training.checkpointing import CheckpointError, list_checkpoints, verify_checkpoint
    from ztsnr_nb.models.checkpoint import save_single_file
    from ztsnr_nb.models.sdxl import build_tiny_sdxl
    from ztsnr_nb.data.latent_cache import CacheWriteError, LatentCache
    from ztsnr_nb.data.sources import scan_kohya_folder
    from ztsnr_nb.data.synthetic import make_synthetic_dataset
    from ztsnr_nb.models.sdxl import build_vae, TinySDXLConfig
    root = Path(sys.argv[1]); res = {}
    acc, unet, opt, sched, st = _tiny_run()
    ck1 = _save(acc, unet, opt, sched, st, root / "run", 1)
    comps = build_tiny_sdxl(seed=0); f = save_single_file(root / "export.safetensors", comps); before = f.read_bytes()
    make_synthetic_dataset(root / "ds", n=8, seed=0, min_side=64, max_side=96); recs, _ = scan_kohya_folder(root / "ds")
    vae = build_vae(TinySDXLConfig(), seed=0); lc = LatentCache(root / "cache")
    lc.build(recs[:4], vae, [(64, 64), (96, 64), (64, 96)], shard_size=2, progress=False)
    limit = 1 << 20
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try: _save(acc, unet, opt, sched, st, root / "run", 2); res["ckpt"] = "saved?!"
    except CheckpointError as e: res["ckpt"] = str(e)
    try: save_single_file(f, comps); res["export"] = "saved?!"
    except Exception as e: res["export"] = f"{type(e).__name__}: {e}"
    big = {f"{i}": torch.zeros(1 << 18) for i in range(2)}   # 2 MB > the limit
    try: lc._begin(lc.fingerprint, lc.settings); lc._commit_shard(0, 99, big, [{"key": "x", "slot": 0}]); res["cache"] = "saved?!"
    except CacheWriteError as e: res["cache"] = str(e)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    res["tmp_left"] = sorted(str(p) for p in root.rglob("*.tmp"))
    res["ckpts"] = [p.name for p in list_checkpoints(root / "run")]
    verify_checkpoint(ck1); res["ck1_verifies"] = True
    res["export_intact"] = f.read_bytes() == before
    res["cache_items"] = len(LatentCache(root / "cache"))
    print(json.dumps(res))
''')


def test_disk_full_via_rlimit_fsize(tmp_path):
    "Writes that hit RLIMIT_FSIZE (EFBIG, what a full disk looks like to a writer): one-line errors, no .tmp, earlier files intact."
    r = subprocess.run([sys.executable, "-c", CHILD_FULL, str(tmp_path), str(Path(__file__).parent)], capture_output=True,
                       text=True, timeout=180, env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    checks = {"checkpoint save": "failed" in res["ckpt"] and "earlier checkpoints are intact" in res["ckpt"]
                                 and res["ckpts"] == ["checkpoint-00000001"] and res["ck1_verifies"],
              "single-file export": res["export"] != "saved?!" and res["export_intact"],
              "cache shard": "every committed shard is intact" in res["cache"] and res["cache_items"] == 4}
    for name, ok in checks.items():
        record(f"disk full (RLIMIT_FSIZE): {name}", ok and not res["tmp_left"], lost=0 if ok else 1)
    assert all(checks.values()) and not res["tmp_left"], res
    assert all("\n" not in res[k] for k in ("ckpt", "cache"))


def test_disk_full_on_a_small_tmpfs(tmp_path):
    "As root where mounting works: a 4 MiB tmpfs is too small for a checkpoint; the free-space check refuses before writing."
    mnt = tmp_path / "tmpfs"; mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root and mount permission (RLIMIT_FSIZE covers the write path)")
    try:
        from ztsnr_nb.training.checkpointing import CheckpointError
        acc, unet, opt, sched, st = _tiny_run()
        with pytest.raises(CheckpointError, match="not enough free space"): _save(acc, unet, opt, sched, st, mnt / "run", 1)
        ok = not list((mnt / "run" / "checkpoints").glob("*"))
        record("disk full (tmpfs): free-space check", ok); assert ok
    finally: subprocess.run(["umount", str(mnt)], capture_output=True)


# ---------------------------------------------------------------------------------------------------------- configs
BAD_SETS = [
    "optim.lr=-1", "optim.lr=0", "optim.lr=inf", "optim.lr=nan", 'optim.lr="fast"', "optim.lr=[1]", "optim.lr.x=1",
    "optim.max_steps=0", "optim.max_steps=-3", "optim.max_steps=1e23", "optim.max_steps=1.5", 'optim.max_steps="10"',
    "data.batch_size=0", "data.batch_size=1000000000", "data.val_items=-1", "data=5", "data.flip=3", "data.crop=\"x\"",
    "data.max_area=10", "data.caption_dropout=2", "data.num_workers=-1", "ema.power=-5", "ema.power=nan", "ema.max_decay=1.5",
    "validation.width=63", "validation.height=0", "validation.prompts=[]", "validation.loss_timesteps=[5000]",
    'validation.loss_timesteps=["a"]', "optim.weight_decay=inf", "optim.eps=0", "optim.beta1=1.5", "optim.grad_accum=0",
    "optim.max_grad_norm=nan", 'optim.mixed_precision="fp8"', 'optim.optimizer="sgd"', 'optim.lr_scheduler="nope"',
    'logging.log_with="foo"', "sampler.steps=0", "sampler.cfg_scale=nan", "checkpoint.keep_last=-1", "checkpoint.every=-1",
    "checkpoint.max_nonfinite_in_row=0", "seed=-1", "nosuch.key=1", "optim.lrr=1", "optim", "=1", "optim.lr=", "optim.lr=1e-4 x",
    'loss.terminal_weight="ones"', 'model.prediction="x"',
]


def _bad_argvs(tmp_path, data_dir):
    afile = tmp_path / "afile"; afile.write_text("x")
    files = {"deep.toml": "a = " + "[" * 5000 + "]" * 5000, "syntax.toml": "[optim\nlr = 1", "binary.toml": b"\x00\xff\xfe\x80garbage",
             "unknown.toml": "[nosuch]\nx = 1", "dupe.toml": "seed = 1\nseed = 2", "type.toml": "optim = 3", "bad.json": "{not json"}
    argvs = []
    for name, body in files.items():
        f = tmp_path / name
        f.write_bytes(body if isinstance(body, bytes) else body.encode())
        argvs.append((str(f),))
    base = ("--data", str(data_dir), "--set", "model.tiny=true", "--output-dir", str(tmp_path / "o"))
    argvs += [base + ("--set", s) for s in BAD_SETS]
    argvs += [("--data", str(data_dir), "--set", "model.tiny=true", "--output-dir", str(afile)),
              ("--data", str(data_dir), "--set", "model.tiny=true", "--output-dir", "/proc/nope/out"),
              base + ("--set", f'data.cache_dir="{afile}/c"'), base + ("--resume", str(tmp_path)),
              ("--data", str(tmp_path / "missing"), "--set", "model.tiny=true"), ("--data", str(data_dir)),
              base + ("--set", f'model.pretrained="{tmp_path / "nope.safetensors"}"', "--set", "model.tiny=false"),
              base + ("--max-steps", "-1"), (str(tmp_path / "missing.toml"),), (str(tmp_path),), ("--resume", "latest"),
              ("--trust-checkpoint",), ("--bogus-flag",)]
    try: import wandb  # noqa: F401
    except ImportError: argvs.append(base + ("--set", 'logging.log_with="wandb"'))
    return argvs


def test_bad_configs_exit_2_with_one_line(tmp_path, data_dir, capsys):
    "50+ generated bad configs and arguments: exit 2, exactly one line on stderr, no traceback, nothing loaded."
    from ztsnr_nb.cli import main
    argvs = _bad_argvs(tmp_path, data_dir)
    assert len(argvs) >= 50
    failures = []
    for argv in argvs:
        try: rc = main(list(argv))
        except SystemExit as e: rc = e.code                     # argparse errors
        err = capsys.readouterr().err
        ok = rc == 2 and err.count("\n") == 1 and "Traceback" not in err
        record("bad config/arguments -> exit 2, one line", ok)
        if not ok: failures.append((argv, rc, err[-500:]))
    assert not failures, failures[:5]
    # the same through real processes for a few, as a user runs them
    for argv in argvs[:3] + argvs[-6:-3]:
        r = run_cli("-m", "ztsnr_nb.cli", *argv, timeout=120)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, (argv, r.stderr)
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_generate_missing_model_creates_nothing(tmp_path):
    "ztsnr_nb_generate fails on a missing model before creating --out."
    r = run_cli("-c", "import sys; from ztsnr_nb.cli import generate_main; "
                f"sys.exit(generate_main(['--model', '{tmp_path / 'nope'}', '--prompt', 'x', '--out', '{tmp_path / 'out'}']))", timeout=120)
    ok = r.returncode == 2 and r.stderr.count("\n") == 1 and not (tmp_path / "out").exists()
    record("generate: missing model, no --out created", ok); assert ok, r.stderr


# ---------------------------------------------------------------------------------------------------------- data
def test_bad_input_corpus_is_reported_never_raised(tmp_path, data_dir):
    "Every file of the hostile folder and shard is kept or reported with a reason; caches never raise; captions bounded."
    from ztsnr_nb.data.latent_cache import LatentCache, TextEmbeddingCache
    from ztsnr_nb.data.sources import (IMAGE_EXTS, MAX_CAPTION_BYTES, ScanReport, iter_webdataset, make_hostile_shard,
                                       scan_kohya_folder)
    from ztsnr_nb.models.sdxl import build_tiny_sdxl
    recs, rep = scan_kohya_folder(data_dir)
    images = [p for p in data_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTS
              and not any(part.startswith(".") for part in p.relative_to(data_dir).parts)]
    accounted = rep.seen == rep.kept + rep.n_skipped == len(images)
    record("hostile kohya folder: every image kept or reported", accounted); assert accounted, (rep.counts, len(images))
    reasons = set(rep.skipped)
    assert {"dangling_link", "directory", "special_file", "truncated", "not_an_image", "zero_byte", "too_large"} <= reasons
    long = next(r for r in recs if r.path.endswith("long.png"))
    ok = len(long.caption.encode()) <= MAX_CAPTION_BYTES and str(data_dir / "long.png") in rep.repaired["long_caption"]
    record("2.4 MB caption capped and reported", ok); assert ok
    shard = tmp_path / "hostile.tar"
    expected = make_hostile_shard(shard, (data_dir / "long.png").read_bytes())
    srep = ScanReport("hostile"); srecs = list(iter_webdataset(shard, report=srep, min_side=32))
    ok = {x: r for r, xs in srep.skipped.items() for x in xs} == expected and [r.key for r in srecs] == ["a", "b", "c"]
    record("hostile shard: duplicate keys, links, devices reported", ok); assert ok
    with pytest.raises(ValueError, match="allow_pipe"): list(iter_webdataset(f"pipe:touch {tmp_path / 'PIPED'}"))
    record("pipe: source refused without allow_pipe", not (tmp_path / "PIPED").exists())
    m = build_tiny_sdxl(seed=0)
    crep = LatentCache(tmp_path / "lat").build(recs + srecs, m.vae, [(64, 64), (96, 64), (64, 96), (128, 64), (64, 128)], progress=False)
    ok = crep.encoded + len(crep.failed) == crep.owned and crep.encoded > 0
    record("latent cache over the hostile records: failures listed", ok); assert ok, crep
    t0 = time.perf_counter()
    trep = TextEmbeddingCache(tmp_path / "txt").build([r.caption for r in recs] + ["word " * 3000], m.text_encoder, m.text_encoder_2,
                                                        m.tokenizer, m.tokenizer_2, progress=False)
    ok = trep.encoded == trep.owned and time.perf_counter() - t0 < 60
    record("text cache over long captions: bounded time", ok); assert ok


def test_zz_print_table():
    "Last in the file: the summary table (also printed by the terminal-summary hook in conftest.py)."
    print("\n" + table())
