"""check_weights.py --fetch against a local HTTP server (127.0.0.1 only): hashes, temp files, errors, exit status."""

import hashlib
import http.server
import importlib.util
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sdatc import weights
from sdatc.errors import SdatcError, run_cli
from sdatc.weights import WeightFile, fetch_missing, mirrored

ROOT = Path(__file__).resolve().parents[1]
GOOD = b"good weights " * 1000
OTHER = b"other weights"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.hits.append(self.path)
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """(base URL, served files by path, requested paths); stopped at the end."""
    handler = type("Handler", (_Handler,), {"files": {}, "hits": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler.files, handler.hits
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def table(monkeypatch):
    """A test table on the real hosts (the mirror redirects them): full hash, prefix, no hash, wrong hash, 404."""
    files = {
        "full": (WeightFile("full.pth", "hub/pyiqa", ("full",), "https://huggingface.co/w/resolve/main/full.pth",
                            sha256=_sha(GOOD)),),
        "prefix": (WeightFile(f"net-{_sha(GOOD)[:8]}.pth", "hub/checkpoints", ("prefix",),
                              f"https://download.pytorch.org/models/net-{_sha(GOOD)[:8]}.pth",
                              sha256_prefix=_sha(GOOD)[:8], verified=True),),
        "nohash": (WeightFile("model.mat", "hub/pyiqa", ("nohash",), "https://huggingface.co/w/resolve/main/model.mat"),),
        "wrong": (WeightFile("wrong.pt", "hub/clip", ("wrong",), "https://openaipublic.azureedge.net/clip/wrong.pt",
                             sha256=_sha(GOOD)),),
        "gone": (WeightFile("gone.pth", "hub/pyiqa", ("gone",), "https://huggingface.co/w/resolve/main/gone.pth"),),
    }
    monkeypatch.setattr(weights, "METRIC_FILES", files)
    monkeypatch.delenv("SDATC_WEIGHTS_MIRROR", raising=False)
    return files


def _serve_table(files: dict[str, bytes]) -> None:
    files["/w/resolve/main/full.pth"] = GOOD
    files[f"/models/net-{_sha(GOOD)[:8]}.pth"] = GOOD
    files["/w/resolve/main/model.mat"] = OTHER
    files["/clip/wrong.pt"] = OTHER  # served, but its hash is not the table's


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob(".*"))


def test_mirrored_replaces_scheme_and_host_only():
    url = "https://download.pytorch.org/models/x-1234abcd.pth"
    assert mirrored(url, None) == url
    assert mirrored(url, "http://127.0.0.1:8000") == "http://127.0.0.1:8000/models/x-1234abcd.pth"
    assert mirrored(url, "https://mirror.example/pt/") == "https://mirror.example/pt/models/x-1234abcd.pth"
    with pytest.raises(SdatcError, match="mirror must be a URL"):
        mirrored(url, "mirror.example")


def test_fetch_verifies_rejects_and_leaves_nothing_behind(server, table, tmp_path, capsys):
    base, files, hits = server
    _serve_table(files)
    report = fetch_missing(tmp_path, mirror=base, progress=False)
    assert report["fetched"] == ["full.pth", f"net-{_sha(GOOD)[:8]}.pth", "model.mat"]
    assert report["failed"] == ["wrong.pt", "gone.pth"] and report["present"] == []
    assert (tmp_path / "hub/pyiqa/full.pth").read_bytes() == GOOD
    assert (tmp_path / f"hub/checkpoints/net-{_sha(GOOD)[:8]}.pth").read_bytes() == GOOD
    assert (tmp_path / "hub/pyiqa/model.mat").read_bytes() == OTHER  # no known hash: kept, its sha256 printed
    out, err = capsys.readouterr()
    assert _sha(OTHER) in out
    # a wrong hash: one line naming the file, the expected and the actual hash; no final file, no temp file
    wrong = [line for line in err.splitlines() if "wrong.pt" in line]
    assert len(wrong) == 1 and "sha256 mismatch" in wrong[0]
    assert f"expected {_sha(GOOD)}" in wrong[0] and f"got {_sha(OTHER)}" in wrong[0]
    assert not (tmp_path / "hub/clip/wrong.pt").exists()
    # a 404: a clear error, nothing left
    assert any(line.startswith("error: gone.pth: HTTP 404") for line in err.splitlines())
    assert not (tmp_path / "hub/pyiqa/gone.pth").exists()
    assert _leftovers(tmp_path) == []
    assert all(path.startswith(("/w/", "/models/", "/clip/")) for path in hits)  # the mirror kept each path


def test_present_files_are_not_downloaded_again(server, table, tmp_path):
    base, files, hits = server
    _serve_table(files)
    (tmp_path / "hub/pyiqa").mkdir(parents=True)
    (tmp_path / "hub/pyiqa/full.pth").write_bytes(b"mine")  # present: left alone, even with another hash
    report = fetch_missing(tmp_path, mirror=base, progress=False)
    assert "full.pth" in report["present"] and "/w/resolve/main/full.pth" not in hits
    assert (tmp_path / "hub/pyiqa/full.pth").read_bytes() == b"mine"
    hits.clear()
    again = fetch_missing(tmp_path, mirror=base, progress=False)
    assert again["fetched"] == [] and set(again["present"]) == {"full.pth", f"net-{_sha(GOOD)[:8]}.pth", "model.mat"}
    assert hits == ["/clip/wrong.pt", "/w/resolve/main/gone.pth"]  # only the still-missing ones are asked for


def test_mirror_from_the_environment(server, table, tmp_path, monkeypatch):
    base, files, _ = server
    _serve_table(files)
    monkeypatch.setenv("SDATC_WEIGHTS_MIRROR", base)
    assert "full.pth" in fetch_missing(tmp_path, progress=False)["fetched"]


def _script_main():
    spec = importlib.util.spec_from_file_location("check_weights_script", ROOT / "scripts" / "check_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_exits_non_zero_when_any_failed(server, table, tmp_path, capsys):
    base, files, _ = server
    _serve_table(files)
    main = _script_main()
    with pytest.raises(SystemExit) as e:
        run_cli(main, ["--weights", str(tmp_path), "--fetch", "--mirror", base])
    assert e.value.code != 0
    out, err = capsys.readouterr()
    assert "fetch: 3 fetched, 0 already present, 2 failed" in out
    assert err.strip().splitlines()[-1] == "error: could not fetch wrong.pt, gone.pth (the reasons are above)"
    files["/clip/wrong.pt"] = GOOD
    files["/w/resolve/main/gone.pth"] = OTHER
    with pytest.raises(SystemExit) as e:
        run_cli(main, ["--weights", str(tmp_path), "--fetch", "--mirror", base])
    assert e.value.code == 0 and "fetch: 2 fetched, 3 already present, 0 failed" in capsys.readouterr().out


def test_real_table_through_the_cli(server, tmp_path):
    """The real table and script, every URL sent to the local server: the hashed files are rejected
    (fake bytes), the two without a known hash are kept, non-zero exit, no temp file left."""
    base, files, hits = server
    for f in weights.weight_files():
        files[mirrored(f.url, base)[len(base):]] = OTHER
    env = dict(os.environ, SDATC_WEIGHTS_MIRROR=base)
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_weights.py"), "--weights", str(tmp_path),
                        "--fetch"], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode != 0
    assert "fetch: 2 fetched, 0 already present, 7 failed" in p.stdout
    assert p.stderr.count("sha256 mismatch") == 7
    assert "expected 7be5be79..., got " + _sha(OTHER) in p.stderr  # torchvision: the name's prefix
    written = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["ckpt_koniq10k.pt", "niqe_modelparameters.mat"]
    assert len(hits) == 9
