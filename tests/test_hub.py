"""ztsnr_nb.hub against a local HTTP stand-in of the Hugging Face Hub on 127.0.0.1.

The real `huggingface_hub` client (HfApi.create_repo / create_commit: preupload, LFS batch, LFS PUT, commit) talks to a
small threaded server that implements those endpoints the way the Hub answers them, stores LFS objects by sha256 and
records commits. The tests check the files that land, a connection dropped in the middle of the LFS uploads (one-line
error, no commit, nothing reported as pushed), the retry after it, and the console command in a subprocess.
"""
import base64
import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import ROOT, run_cli

TOKEN = "hf_" + "t" * 34


class HubStandIn(ThreadingHTTPServer):
    "The Hub endpoints a create_repo + create_commit needs; `fail_puts_after` drops connections after that many LFS PUTs."
    daemon_threads = True

    def __init__(self, fail_puts_after=None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.base = f"http://127.0.0.1:{self.server_address[1]}"
        self.repos, self.lfs, self.commits, self.auth = {}, {}, [], set()
        self.fail_puts_after, self.puts, self.dropped, self.lock = fail_puts_after, 0, 0, threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):  # quiet
        pass

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json(self, obj, status=200):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        s, path = self.server, self.path.split("?")[0]
        s.auth.add(self.headers.get("Authorization", ""))
        body = self._body()
        parts = path.strip("/").split("/")
        if path == "/api/repos/create":
            p = json.loads(body)
            rid = f"{p['organization']}/{p['name']}"
            if rid in s.repos:
                return self._json({"error": "You already created this model repo", "url": f"{s.base}/{rid}"}, 409)
            s.repos[rid] = p
            return self._json({"url": f"{s.base}/{rid}"})
        if path == "/api/validate-yaml":
            return self._json({"errors": [], "warnings": []})
        if parts[:2] == ["api", "models"] and len(parts) >= 5 and parts[4] == "preupload":
            files = json.loads(body)["files"]
            return self._json({"files": [{"path": f["path"], "uploadMode": "lfs" if f["size"] > 2048 else "regular",
                                          "shouldIgnore": False, "oid": None} for f in files]})
        if path.endswith(".git/info/lfs/objects/batch"):
            objs = json.loads(body)["objects"]
            out = [{"oid": o["oid"], "size": o["size"]} if o["oid"] in s.lfs else
                   {"oid": o["oid"], "size": o["size"], "actions": {"upload": {"href": f"{s.base}/lfs-upload/{o['oid']}"}}}
                   for o in objs]
            return self._json({"transfer": "basic", "objects": out})
        if parts[:2] == ["api", "models"] and len(parts) >= 5 and parts[4] == "commit":
            rid = f"{parts[2]}/{parts[3]}"
            lines = [json.loads(l) for l in body.decode().splitlines() if l.strip()]
            files = {}
            for l in lines:
                v = l["value"]
                if l["key"] == "file":
                    files[v["path"]] = base64.b64decode(v["content"])
                elif l["key"] == "lfsFile":
                    if v["oid"] not in s.lfs:
                        return self._json({"error": f"LFS object {v['oid']} of {v['path']} was never uploaded"}, 400)
                    files[v["path"]] = s.lfs[v["oid"]]
            s.commits.append({"repo": rid, "files": files, "message": lines[0]["value"]["summary"]})
            return self._json({"commitUrl": f"{s.base}/{rid}/commit/{len(s.commits):040d}",
                               "commitOid": f"{len(s.commits):040d}", "pullRequestUrl": None})
        return self._json({"error": f"stand-in has no POST {path}"}, 404)

    def do_PUT(self):
        s = self.server
        oid = self.path.rsplit("/", 1)[-1]
        n = int(self.headers.get("Content-Length") or 0)
        with s.lock:
            s.puts += 1
            fail = s.fail_puts_after is not None and s.puts > s.fail_puts_after
        if fail:  # the network goes away mid-upload: read part of the body, then drop the connection
            self.rfile.read(min(n, 512))
            with s.lock:
                s.dropped += 1
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        data = self.rfile.read(n)
        if hashlib.sha256(data).hexdigest() != oid:
            return self._json({"error": "sha256 mismatch"}, 400)
        with s.lock:
            s.lfs[oid] = data
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def standin():
    servers = []

    def start(**kw):
        srv = HubStandIn(**kw)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    "A run folder with a real tiny export (diffusers folder + single file), config, summary and a sample grid."
    from PIL import Image

    from ztsnr_nb.models.checkpoint import save_diffusers, save_single_file
    from ztsnr_nb.models.sdxl import build_tiny_sdxl

    run = tmp_path_factory.mktemp("hub") / "run"
    (run / "export").mkdir(parents=True)
    (run / "samples").mkdir()
    m = build_tiny_sdxl(seed=0)
    save_diffusers(run / "export" / "diffusers", m, prediction="v", ztsnr=True)
    save_single_file(run / "export" / "model.safetensors", m, prediction="v", ztsnr=True)
    (run / "config.json").write_text(json.dumps({"model": {"prediction": "v", "ztsnr": True}, "optim": {"lr": 1e-5}}))
    (run / "summary.json").write_text(json.dumps({"step": 10}))
    Image.new("RGB", (64, 32), "black").save(run / "samples" / "step-00000010.png")
    return run


@pytest.fixture
def client(monkeypatch):
    "The real huggingface_hub client, online (conftest sets offline), legacy LFS path (no xet CAS server here), no retry waits."
    import huggingface_hub.constants as c
    import huggingface_hub.utils._http as http

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(c, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(http.time, "sleep", lambda s: None)
    monkeypatch.setenv("HF_TOKEN", TOKEN)


def _local_files(export: Path) -> dict:
    from ztsnr_nb.hub import upload_plan

    return {r: p.read_bytes() for p, r in upload_plan(export)}


def test_push_lands_every_file(standin, run_dir, client, caplog):
    from ztsnr_nb.hub import push_to_hub

    srv = standin()
    caplog.set_level("DEBUG")
    res = push_to_hub(run_dir, "someone/tiny-vpred", endpoint=srv.base)
    assert srv.repos["someone/tiny-vpred"]["visibility"] == "private"
    assert len(srv.commits) == 1
    got = srv.commits[0]["files"]
    want = _local_files(run_dir / "export")
    assert got.keys() == want.keys() == set(res.files)
    assert all(got[k] == want[k] for k in want)  # byte-identical, through LFS and inline uploads
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "model.safetensors", "README.md",
            "samples.png", "training_config.json"} <= set(got)
    assert len(srv.lfs) >= 5  # the weights and the grid went through LFS
    assert srv.auth == {f"Bearer {TOKEN}"}  # the token went to the Hub ...
    assert TOKEN not in caplog.text  # ... and not into the logs
    assert res.commit_url.startswith(srv.base)
    # pushing again to the existing repo: create_repo's 409 is fine, a second commit lands, LFS is deduplicated
    puts = srv.puts
    push_to_hub(run_dir, "someone/tiny-vpred", endpoint=srv.base)
    assert len(srv.commits) == 2 and srv.puts == puts


def test_network_failure_mid_upload(standin, run_dir, client, caplog):
    from ztsnr_nb.hub import HubPushError, push_to_hub

    srv = standin(fail_puts_after=2)
    caplog.set_level("INFO")
    with pytest.raises(HubPushError) as ei:
        push_to_hub(run_dir, "someone/tiny-vpred", endpoint=srv.base)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("push to someone/tiny-vpred failed while uploading")
    assert "none of these files were published" in msg and TOKEN not in msg
    assert srv.dropped >= 1 and 1 <= len(srv.lfs) <= 2  # it really failed part-way through the LFS uploads
    assert srv.commits == []  # nothing committed ...
    assert "pushed" not in caplog.text  # ... and nothing reported as pushed
    # the network comes back: the same push completes, re-sending only what had not arrived
    srv.fail_puts_after = None
    before = set(srv.lfs)
    push_to_hub(run_dir, "someone/tiny-vpred", endpoint=srv.base)
    assert len(srv.commits) == 1 and srv.commits[0]["files"].keys() == _local_files(run_dir / "export").keys()
    assert before <= set(srv.lfs)


def test_cli_subprocess(standin, run_dir, tmp_path):
    srv = standin()
    env = {"HF_ENDPOINT": srv.base, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
           "HF_HOME": str(tmp_path / "hf_home")}
    code = "import sys; from ztsnr_nb.hub import main; sys.exit(main(sys.argv[1:]))"
    r = run_cli("-c", code, str(run_dir), "--repo", "someone/cli-model", "--public", "--base-model",
                "stabilityai/stable-diffusion-xl-base-1.0", timeout=120, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("pushed ") and "(public)" in r.stdout
    assert TOKEN not in r.stdout + r.stderr
    assert srv.repos["someone/cli-model"]["visibility"] == "public"
    card = srv.commits[0]["files"]["README.md"].decode()
    assert "base_model: stabilityai/stable-diffusion-xl-base-1.0" in card  # --base-model regenerated the card
    assert not list((tmp_path / "hf_home").rglob("*token*"))  # nothing stored the token
    # no token anywhere: a clear one-line error before any request
    env2 = dict(env, HF_TOKEN="", HF_HOME=str(tmp_path / "empty_home"))
    r = run_cli("-c", code, str(run_dir), "--repo", "someone/other", timeout=120, env=env2, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.startswith("error: no Hugging Face token") and r.stderr.count("\n") == 1
    assert "someone/other" not in srv.repos
    # the Hub stand-in goes away entirely: exit 1, one line
    srv.shutdown()
    srv.server_close()
    r = run_cli("-c", code, str(run_dir), "--repo", "someone/gone", timeout=120, env=dict(env, HF_HUB_ETAG_TIMEOUT="2"), cwd=ROOT)
    assert r.returncode == 1 and r.stderr.startswith("error: push to someone/gone failed while creating the repository")
    assert r.stderr.count("\n") == 1 and TOKEN not in r.stderr
