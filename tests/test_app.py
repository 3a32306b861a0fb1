"""scripts/app.py: the app served from a subprocess on a free loopback port, driven by gradio_client and by
a real browser (Debian's chromium through Playwright).

The clip is the demo clip cut to 6 frames of its centre (160x96), so that each restore with the preview
model takes seconds on a CPU; the app is started with it as its demo clip. The browser test saves its
screenshots in the test's folder; with SDATC_APP_SCREENSHOTS=docs it also writes README's pictures there.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from sdatc.config import REPO_ROOT

pytest.importorskip("gradio", reason="the app's optional extra is not installed (pip install -e '.[app]')")
gradio_client = pytest.importorskip("gradio_client")

CHROMIUM = "/usr/bin/chromium"
FRAMES, W, H = 6, 160, 96


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory) -> Path:
    """The demo clip's first 6 frames, its centre 160x96."""
    from sdatc.data.video import VideoWriter, read_video

    frames = read_video(REPO_ROOT / "assets/demo.mp4", max_frames=FRAMES)[:, 42:42 + H, 80:80 + W]
    path = tmp_path_factory.mktemp("clips") / "demo_short.mp4"
    with VideoWriter(path, fps=25, crf=30) as w:
        for f in frames:
            w.write(f)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, short_demo):
    """(url, the server's TMPDIR, its log file): the app in a subprocess, stopped at the end."""
    root = tmp_path_factory.mktemp("app")
    tmp, log = root / "tmp", root / "server.log"
    tmp.mkdir()
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if k != "SDATC_SD21_PATH"},
           "TMPDIR": str(tmp), "GRADIO_TEMP_DIR": str(root / "gradio"), "PYTHONPATH": str(REPO_ROOT),
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, str(REPO_ROOT / "scripts/app.py"), "--port", str(port), "--demo-clip", str(short_demo),
           "--output-preset", "ultrafast", "--max-frames", "100"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the app did not start: {log.read_text()[-3000:]}")
        time.sleep(0.5)
    yield url, tmp, log
    proc.terminate()
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        proc.kill()


def job_folders(tmp: Path) -> list[Path]:
    return sorted(tmp.glob("sdatc-app-*"))


def predict(client, clip, model="preview"):
    from gradio_client import handle_file

    return client.predict(handle_file(str(clip)), model, 50, 0.75, "adain", 0, "clipiqa", 0.5, api_name="/restore")


def test_app_restores_the_demo_clip(server, short_demo):
    """gradio_client: the demo clip -> an mp4 of 4x size with its frame count and frame times; the job's
    temporary folder is gone afterwards."""
    from sdatc.data.video import VideoReader

    url, tmp, _ = server
    client = gradio_client.Client(url, verbose=False)
    video, compare, zoom, download, note = predict(client, short_demo)
    assert Path(video).name == "demo_short_x4.mp4" and Path(download).name == "demo_short_x4.mp4"
    with VideoReader(video) as out, VideoReader(short_demo) as inp:
        assert (out.meta.width, out.meta.height) == (4 * W, 4 * H)
        assert len(out) == len(inp) == FRAMES
        frames, _ = out.read_all(), inp.read_all()
        assert out.timestamps == inp.timestamps and len(inp.timestamps) == FRAMES
    assert frames.shape == (FRAMES, 4 * H, 4 * W, 3) and frames.std() > 5  # a picture, not a blank
    assert len(compare) == 2 and all(Path(p).is_file() for p in [*compare, zoom])
    assert f"Restored {FRAMES} frames, {W}x{H} -> {4 * W}x{4 * H}" in note and "DCM" in note
    assert job_folders(tmp) == []


def test_app_bad_input_is_a_message_and_the_server_keeps_serving(server, short_demo, tmp_path):
    """A broken file, a non-video, an unconfigured model: one readable line each on the page (no traceback,
    no cache path; a server-side traceback of gradio's own refusal stays in its log); the server answers the
    next job; no temporary folder is left behind."""
    from gradio_client.exceptions import AppError

    url, tmp, _ = server
    client = gradio_client.Client(url, verbose=False)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(os.urandom(4000))
    text = tmp_path / "notes.txt"
    text.write_text("not a video")
    for clip, model, expected in ((broken, "preview", "broken.mp4: not a readable video"),
                                  (text, "preview", "Invalid file type"),  # gradio refuses it itself
                                  (short_demo, "sdatc", "--sd21 PATH")):
        with pytest.raises(AppError) as e:
            predict(client, clip, model)
        message = str(e.value)
        assert expected in message, message
        assert "Traceback" not in message and "gradio" not in message and "\n" not in message
    video, *_ = predict(client, short_demo, "bicubic")  # still serving
    assert Path(video).stat().st_size > 0
    assert job_folders(tmp) == []


def shows(page, selector: str, text: str, timeout: float = 30_000) -> None:
    """Wait until the element's text, spaces and line breaks removed, holds ``text`` (file names are split)."""
    page.wait_for_function("([sel, text]) => (document.querySelector(sel)?.innerText || '').replace(/\\s/g, '')"
                           ".includes(text)", arg=[selector, text], timeout=timeout)


def test_app_runs_one_job_at_a_time(server, short_demo):
    """Three jobs at once: the later ones wait in the queue (their places are reported) and all finish."""
    url, _, _ = server
    client = gradio_client.Client(url, verbose=False)
    from gradio_client import handle_file

    args = ("preview", 50, 0.75, "adain", 0, "clipiqa", 0.5)
    jobs = [client.submit(handle_file(str(short_demo)), *args, api_name="/restore") for _ in range(3)]
    seen = set()
    places = set()  # the places seen while waiting (any job may reach the server first)
    while not all(job.done() for job in jobs):
        for job in jobs:
            status = job.status()
            seen.add(status.code.name)
            if status.code.name == "IN_QUEUE" and status.rank is not None:
                places.add(status.rank)
        time.sleep(0.02)
    assert all(Path(job.result(timeout=60)[0]).is_file() for job in jobs)
    assert places and min(places) >= 0, (places, seen)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no {CHROMIUM} (CI's .ci/run installs Debian's chromium)")
def test_app_in_a_browser(server, short_demo, tmp_path):
    """Chromium: open the page, upload the demo clip, press Restore, wait for the restored video (decodable by
    the browser: its width known); screenshot; then 'Use the demo clip' puts the bundled clip in place; a
    broken file is one line on the page (screenshot)."""
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api")
    url, _, _ = server
    upload, broken = tmp_path / "my_upload.mp4", tmp_path / "broken.mp4"
    shutil.copyfile(short_demo, upload)
    broken.write_bytes(os.urandom(4000))
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                       args=args, headless=True,
                                                       viewport={"width": 1280, "height": 1000})
        try:
            page = browser.new_page()
            page.goto(url, timeout=60_000)
            page.locator("#clip input[type=file]").set_input_files(str(upload))
            shows(page, "#clip", "my_upload.mp4")
            page.locator("#restore").click()
            page.locator("#result-note").get_by_text("Restored 6 frames").wait_for(timeout=90_000)
            video = page.locator("#restored video")
            video.wait_for(timeout=30_000)
            assert "my_upload_x4.mp4" in (video.get_attribute("src") or "")
            page.wait_for_function("document.querySelector('#restored video').readyState >= 1", timeout=30_000)
            assert page.evaluate("document.querySelector('#restored video').videoWidth") == 4 * W  # decodable
            shot = tmp_path / "app.png"
            page.screenshot(path=str(shot), full_page=True)
            page.locator("#use-demo").click()  # the bundled demo clip replaces the upload
            shows(page, "#clip", "demo_short.mp4")
            page.locator("#clip button[aria-label=Clear]").click()  # a broken file: one line on the page
            page.locator("#clip input[type=file]").set_input_files(str(broken))
            shows(page, "#clip", "broken.mp4")
            page.locator("#restore").click()
            page.get_by_text("broken.mp4: not a readable video").first.wait_for(state="visible", timeout=30_000)
            page.wait_for_timeout(500)  # the message's slide-in
            assert "Restored" not in page.locator("#result-note").inner_text()  # the last job's results are gone
            assert "Traceback" not in page.locator("body").inner_text()
            error_shot = tmp_path / "app_error.png"
            page.screenshot(path=str(error_shot))
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    folder = os.environ.get("SDATC_APP_SCREENSHOTS")
    if folder:  # README's pictures (docs/app.png, docs/app_error.png), 960 wide, 256 colours: small enough to commit
        from PIL import Image

        for png in (shot, error_shot):
            im = Image.open(png).convert("RGB")
            im = im.resize((960, im.height * 960 // im.width), Image.Resampling.LANCZOS)
            im.quantize(256).save(REPO_ROOT / folder / png.name, optimize=True)


def test_app_limits_are_one_line_errors(short_demo, tmp_path, monkeypatch):
    """--max-frames, --max-upload-mb, a clip too small, a missing model: refused before any work, in words."""
    monkeypatch.delenv("SDATC_SD21_PATH", raising=False)
    from sdatc.app import AppConfig, Restorer, Settings
    from sdatc.data.video import VideoWriter
    from sdatc.errors import SdatcError

    tiny = tmp_path / "tiny.mp4"
    with VideoWriter(tiny, fps=25, crf=30) as w:
        for _ in range(2):
            w.write(np.zeros((8, 8, 3), np.uint8))
    cases = ((AppConfig(max_frames=5), short_demo, "has 6 frames; this app takes at most 5 (--max-frames)"),
             (AppConfig(max_upload_mb=0.001), short_demo, "this app takes at most 0.001 MB (--max-upload-mb)"),
             (AppConfig(), tiny, "tiny.mp4 is 8x8: too small"))
    for cfg, clip, message in cases:
        with pytest.raises(SdatcError, match=re.escape(message)):
            Restorer(cfg).restore(clip, "preview", Settings(), tmp_path)
    with pytest.raises(SdatcError, match=r"UltraVSR .* is not configured: it needs SD 2\.1-base weights"):
        Restorer(AppConfig()).restore(short_demo, "ultravsr", Settings(), tmp_path)
    assert list(tmp_path.glob("*.mp4")) == [tiny]  # nothing written
