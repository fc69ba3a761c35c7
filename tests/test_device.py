"""ztsnr_nb.training.device at process level: the GPU benchmark's CPU smoke run, dynamic batch sizing inside a real
optimizer loop (OOM injected), and memory tracking of a child process."""
import json
import math

import pytest
import torch

from conftest import ROOT, run_cli


def test_bench_cpu_smoke(tmp_path):
    out = tmp_path / "bench.json"
    r = run_cli(str(ROOT / "bench" / "bench_sdxl_step.py"), "--cpu-smoke", "--json", str(out), timeout=120,
                env={"OMP_NUM_THREADS": "1"}, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = {(x["batch"], x["checkpointing"], x["attention"], x["optimizer"], x["ema"], x["memory_format"]): x for x in res["rows"]}
    ok = [x for x in res["rows"] if x["status"] == "ok"]
    assert {(b, c) for b in (1, 2) for c in ("off", "on")} <= {(x["batch"], x["checkpointing"]) for x in ok}
    assert all(x["status"] in ("ok", "skipped") and (x["status"] == "ok" or x["reason"]) for x in res["rows"])
    for x in ok:  # timings are sane and the FLOP rate follows from them
        assert 0 < x["step_min_s"] <= x["step_s"] <= x["step_max_s"]
        f = 3 * res["forward_flops"] * x["batch"]
        assert math.isclose(x["tflops_per_s"], f / x["step_s"] / 1e12, rel_tol=1e-9)
        assert x["mfu"] is None  # no peak is known for a CPU
    for changed in (("sdpa", "adafactor", "device", "contiguous"), ("sdpa", "adamw_fused", "cpu", "contiguous"),
                    ("sdpa", "adamw_fused", "device", "channels_last")):
        assert rows[(1, "on", *changed)]["status"] == "ok"
    assert rows[(1, "on", "xformers", "adamw_fused", "device", "contiguous")]["status"] in ("ok", "skipped")
    assert res["flop_checks"]["this_unet"]["analytic"] == res["flop_checks"]["this_unet"]["flop_counter"]
    assert abs(res["sdxl_1024_forward_flops"] / 1e12 - 6.76) < 0.01  # RESEARCH §7
    assert "no CUDA device" in r.stdout  # the allocator switch says why it did nothing


def test_bench_refuses_gpu_run_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = run_cli(str(ROOT / "bench" / "bench_sdxl_step.py"), "--no-flop-check", timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "no CUDA device" in r.stderr and "--cpu-smoke" in r.stderr


def _train(steps, oom_limit=None):
    "A few optimizer steps of the tiny UNet on 2 batches of 4 per step; `oom_limit` injects CUDA OOMs above that micro-batch."
    from ztsnr_nb.models.sdxl import build_tiny_sdxl
    from ztsnr_nb.training.device import OOMController, batch_len

    torch.manual_seed(0)
    unet = build_tiny_sdxl(seed=0).unet
    # SGD with momentum: linear in the gradients, so float-order noise between split and unsplit steps stays noise
    # (Adam's g/sqrt(v) would magnify it where a gradient is ~0 and make the comparison a test of Adam, not of the split)
    opt = torch.optim.SGD(unet.parameters(), lr=1e-2, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    data = [{"latents": torch.randn(4, 4, 4, 4, generator=g), "t": torch.randint(0, 1000, (4,), generator=g),
             "ctx": torch.randn(4, 77, 80, generator=g), "pooled": torch.randn(4, 48, generator=g),
             "tid": torch.randn(4, 6, generator=g), "id": torch.arange(4) + 4 * i} for i in range(2 * steps)]
    ctl, seen, events, grads = OOMController(batch_size=4, grad_accum=2), [], [], []
    ctl.on_change = events.append
    attempt = []

    def step_fn(b, w):
        if oom_limit is not None and batch_len(b) > oom_limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        out = unet(b["latents"], b["t"], encoder_hidden_states=b["ctx"],
                   added_cond_kwargs={"text_embeds": b["pooled"], "time_ids": b["tid"]}).sample
        loss = out.square().mean()
        (loss * w / 2).backward()  # accelerate's backward divides by grad_accum = 2
        attempt.extend(b["id"].tolist())
        return loss.detach() * w

    for s in range(steps):
        ctl.run(step_fn, data[2 * s: 2 * s + 2], zero_grad=lambda: opt.zero_grad(set_to_none=True), begin=attempt.clear)
        seen.append(list(attempt))  # the samples of the attempt that completed
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return unet, seen, events, ctl, grads


def test_oom_recovery_matches_unsplit_training():
    ref, ref_seen, _, _, ref_grads = _train(2)
    got, got_seen, events, ctl, got_grads = _train(2, oom_limit=1)
    # halved twice (4 -> 2 -> 1) in the first step, then kept for the rest of the run
    assert [(e["bucket"], e["was"], e["micro_batch"], e["accumulation"]) for e in events] == [("4x4", 4, 2, 4), ("4x4", 2, 1, 8)]
    assert ctl.micro_batch("4x4") == 1 and ctl.effective_batch == 8
    assert got_seen == ref_seen == [list(range(0, 8)), list(range(8, 16))]  # same samples, same order, once each
    for a, b in zip(got_grads, ref_grads):  # every optimizer step saw the full-batch mean gradient
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(got.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_memory_tracker_in_child_process():
    code = ("import torch; from ztsnr_nb.training.device import MemoryTracker\n"
            "t = MemoryTracker(); t.step(); x = torch.ones(80, 2**20); r = t.step(); del x\n"
            "print(r['mem/cpu_rss_peak_gb']); print(t.summary())")
    r = run_cli("-c", code, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    peak, summary = r.stdout.strip().splitlines()[-2:]
    assert float(peak) > 0.3  # 320 MiB were resident at the peak
    assert summary.startswith("memory: CPU RSS ") and "(peak " in summary and "CUDA" not in summary
