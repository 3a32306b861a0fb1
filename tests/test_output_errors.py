"""Full disks and output problems (issue 23.3): a failing writer removes its temporary file and says why in
one line naming the file; bad ``--output`` folders are refused before the model loads; an unreadable subfolder
fails that clip only; a broken model setting is an error even when every output exists.

As root, chmod does not stop reading or writing, so these tests use mechanisms that do: a tmpfs of a few
kilobytes (a real full disk) and a tmpfs remounted read-only, each mounted in a private mount namespace
(``unshare -m``; skipped with the reason where mounting is not permitted), and monkeypatched OSErrors
(ENOSPC, EACCES) for the paths a mount cannot reach cheaply."""

import dataclasses
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from sdatc.config import load_config
from sdatc.data.video import FrameWriter, VideoReader, VideoWriter, write_frames, write_video
from sdatc.errors import SdatcError
from sdatc.inference import InferConfig, run
from sdatc.utils import temp_dir_sibling, temp_sibling

ROOT = Path(__file__).resolve().parents[1]
INFER = ROOT / "scripts" / "infer.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}


def _noise(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def infer_cfg(src: Path, out: Path, config: str = "bicubic.yaml", **kw) -> InferConfig:
    cfg = load_config(InferConfig, ROOT / "configs" / "infer" / config)
    return dataclasses.replace(cfg, input=str(src), output=str(out), copy_audio=False, output_preset="ultrafast", **kw)


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to build the model fails the test: the error must come before the model loads."""
    def refuse(cfg):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr("sdatc.inference.build_model", refuse)


# --------------------------------------------------------------------------- private mounts (root)


def _unshare() -> list[str]:
    """The unshare command that can mount a tmpfs here (as root: -m; else a user namespace: -rm), or skip."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed: no private mount namespace for a tmpfs")
    for cmd in (["unshare", "-m"], ["unshare", "-rm"]):
        probe = subprocess.run([*cmd, "sh", "-c", "mount -t tmpfs -o size=16k tmpfs /tmp"], capture_output=True)
        if probe.returncode == 0:
            return cmd
    pytest.skip(f"mounting a tmpfs is not permitted here ({probe.stderr.decode().strip()[:120]})")


def in_tmpfs(mount: Path, size: str, command: str, readonly: bool = False, timeout: int = 600):
    """Run shell ``command`` with a tmpfs of ``size`` mounted on ``mount``, in a private mount namespace (the
    mount is gone when the command ends, whatever happens)."""
    mount.mkdir(parents=True, exist_ok=True)
    ro = f" && mount -o remount,ro {mount}" if readonly else ""
    script = f"mount -t tmpfs -o size={size} tmpfs {mount}{ro} && {command}"
    return subprocess.run([*_unshare(), "sh", "-c", script], capture_output=True, text=True, timeout=timeout, env=ENV)


def test_full_disk_in_close_removes_the_temporary_file(tmp_path):
    """A real full disk (64 KiB tmpfs): x264 holds 8 frames in its lookahead, so the ENOSPC comes from close()
    as in the campaign; the temporary mp4 is removed and the error names the file and says the disk is full.
    The same for PNG frames (ENOSPC in write)."""
    disk = tmp_path / "disk"
    code = textwrap.dedent(f"""
        import os, numpy as np
        from sdatc.data.video import FrameWriter, VideoWriter
        from sdatc.errors import SdatcError
        frames = np.random.default_rng(0).integers(0, 256, (8, 96, 128, 3), dtype=np.uint8)
        try:
            with VideoWriter("{disk}/clip.mp4", fps=10, crf=0) as w:
                for f in frames:
                    w.write(f)
                print("all frames given")
        except SdatcError as e:
            print("video error:", e)
        print("left:", sorted(os.listdir("{disk}")))
        try:
            with FrameWriter("{disk}/clip") as fw:
                for f in np.repeat(frames, 4, axis=0):
                    fw.write(f)
        except SdatcError as e:
            print("frames error:", e)
        print("left:", sorted(os.listdir("{disk}")))
    """)
    p = in_tmpfs(disk, "64k", f"{sys.executable} -c '{code}'")
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert lines[0] == "all frames given", p.stdout  # the error comes from close(), where x264 flushes
    assert lines[1] == f"video error: cannot write {disk}/clip.mp4: the disk is full (no space left on device)"
    assert lines[2] == "left: []"
    assert lines[3] == f"frames error: cannot write {disk}/clip: the disk is full (no space left on device)"
    assert lines[4] == "left: []"


def test_full_disk_fails_that_clip_only(tmp_path):
    """infer.py with the output on a 96 KiB tmpfs: the large clip does not fit and fails with one line, its
    temporary file is removed, so the small clip after it is restored; exit 1; nothing hidden is left."""
    clips = tmp_path / "clips"
    write_video(clips / "a_big.mp4", _noise(3, 64, 80), fps=10, crf=0)  # 320x256 noise: ~150 KiB per frame
    write_video(clips / "b_small.mp4", np.full((3, 16, 16, 3), 128, np.uint8), fps=10, crf=25)
    disk = tmp_path / "disk"
    cmd = (f"{sys.executable} {INFER} --config {ROOT}/configs/infer/bicubic.yaml --input {clips} --output {disk}/out "
           f"output_preset=ultrafast; echo rc=$?; ls -A {disk}/out")
    p = in_tmpfs(disk, "96k", cmd)
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "rc=1" in p.stdout, p.stdout + p.stderr[-2000:]
    assert f"a_big: failed (rank 0) cannot write {disk}/out/a_big.mp4: the disk is full" in p.stdout
    assert "b_small: done" in p.stdout
    assert p.stdout.strip().splitlines()[-1] == "b_small.mp4", "only the small clip's output is left"


def test_read_only_output_is_refused_before_the_model_loads(tmp_path):
    """A tmpfs remounted read-only as --output: one line, exit 2, no model line printed."""
    disk = tmp_path / "ro"
    clip = write_video(tmp_path / "clip.mp4", _noise(2, 16, 16), fps=10, crf=25)
    cmd = (f"{sys.executable} {INFER} --config {ROOT}/configs/infer/bicubic.yaml --input {clip} --output {disk}/out; "
           "echo rc=$?")
    p = in_tmpfs(disk, "1m", cmd, readonly=True)
    assert "rc=2" in p.stdout and "model:" not in p.stdout, p.stdout + p.stderr[-2000:]
    assert p.stderr.strip() == f"error: output folder {disk} cannot be written: the file system is read-only"


# --------------------------------------------------------------------------- without mounts


class _FailingClose:
    """An av output container whose close() writes what it holds, then fails as a full disk does."""

    def __init__(self, container):
        self._c = container

    def __getattr__(self, name):
        return getattr(self._c, name)

    def close(self):
        self._c.close()
        raise OSError(errno.ENOSPC, "No space left on device")


def test_any_error_in_close_removes_the_temporary_file(tmp_path, monkeypatch):
    import av

    real_open = av.open
    monkeypatch.setattr("sdatc.data.video.av.open", lambda *a, **k: _FailingClose(real_open(*a, **k)))
    with pytest.raises(SdatcError, match=r"^cannot write .*clip\.mp4: the disk is full \(no space left on device\)$"):
        with VideoWriter(tmp_path / "clip.mp4", fps=10) as w:
            w.write(_noise(1, 16, 16)[0])
    assert list(tmp_path.iterdir()) == []


def test_frame_writer_close_failure_keeps_the_old_folder(tmp_path, monkeypatch):
    """overwrite=True and the final rename fails: the old folder is put back as it was, no temporary left."""
    old = write_frames(tmp_path / "frames", _noise(2, 8, 8))
    (old / "mine.txt").write_text("kept")
    real_replace = os.replace
    w = FrameWriter(old, overwrite=True)
    w.write(_noise(1, 8, 8, seed=1)[0])

    def replace(a, b):
        if Path(a) == w.tmp:  # the new folder's rename into place
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(SdatcError, match="frames: the disk is full"):
        w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames"]
    assert sorted(p.name for p in old.iterdir()) == ["00000000.png", "00000001.png", "mine.txt"]


def test_output_that_is_a_file_is_refused_before_the_model_loads(tmp_path, no_model):
    clip = write_video(tmp_path / "clip.mp4", _noise(2, 16, 16), fps=10, crf=25)
    (tmp_path / "out").write_text("a file")
    with pytest.raises(SdatcError, match=r"^output .*out is a file, not a folder$"):
        run(infer_cfg(clip, tmp_path / "out"), progress=False)
    with pytest.raises(SdatcError, match=r"^output .*out/sub: .*out is a file, not a folder$"):
        run(infer_cfg(clip, tmp_path / "out" / "sub"), progress=False)


def test_symlink_loop_output_is_refused(tmp_path, no_model):
    clip = write_video(tmp_path / "clip.mp4", _noise(2, 16, 16), fps=10, crf=25)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(SdatcError, match=r"^output .*loop: a symlink loop$"):
        run(infer_cfg(clip, tmp_path / "loop"), progress=False)


def test_unwritable_output_folder_is_refused(tmp_path, monkeypatch, no_model):
    """EACCES on the probe file (what a folder without write permission gives a non-root user; as root chmod
    cannot produce it, so the probe's mkstemp is monkeypatched)."""
    clip = write_video(tmp_path / "clip.mp4", _noise(2, 16, 16), fps=10, crf=25)
    (tmp_path / "out").mkdir()

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(SdatcError, match=r"^output folder .*out cannot be written: permission denied$"):
        run(infer_cfg(clip, tmp_path / "out"), progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def _unreadable_folder(tmp_path, monkeypatch) -> Path:
    """clips/ with a good clip and a subfolder that cannot be listed: chmod 000 for a normal user; as root
    (chmod does not stop root) Path.iterdir raises EACCES for it (monkeypatched)."""
    clips = tmp_path / "clips"
    write_video(clips / "good.mp4", _noise(2, 16, 16), fps=10, crf=25)
    locked = write_frames(clips / "locked", _noise(2, 16, 16))
    if os.geteuid() != 0:
        locked.chmod(0)
    else:
        real_iterdir = Path.iterdir

        def iterdir(self):
            if self == locked:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_iterdir(self)

        monkeypatch.setattr(Path, "iterdir", iterdir)
    return clips


def test_unreadable_subfolder_fails_that_clip_only(tmp_path, monkeypatch):
    clips = _unreadable_folder(tmp_path, monkeypatch)
    try:
        results = {r["clip"]: r for r in run(infer_cfg(clips, tmp_path / "out"), progress=False)}
    finally:
        (clips / "locked").chmod(0o755)
    assert results["good"]["status"] == "done"
    assert results["locked"]["status"] == "failed"
    assert results["locked"]["error"] == f"cannot read the folder {clips / 'locked'}: permission denied"
    assert VideoReader(tmp_path / "out" / "good.mp4").meta.num_frames == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.mp4"]


@pytest.mark.parametrize("broken", ["checkpoint", "model_config", "config_yaml", "weights_file"])
def test_broken_model_settings_are_errors_even_when_outputs_exist(tmp_path, broken, no_model):
    """Every output exists (nothing to do), but the model setting is broken: an error, not `skipped`, exit 0."""
    clip = write_video(tmp_path / "clip.mp4", _noise(2, 16, 16), fps=10, crf=25)
    out = tmp_path / "out"
    out.mkdir()
    (out / "clip.mp4").write_bytes(b"restored earlier")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ROOT / "assets" / "preview", ckpt)
    settings = {"checkpoint": str(ckpt)}
    if broken == "checkpoint":
        settings["checkpoint"], match = str(tmp_path / "nope"), "checkpoint not found"
    elif broken == "model_config":
        (ckpt / "config.yaml").unlink()
        settings["model_config"], match = str(tmp_path / "nope.yaml"), "config file not found"
    elif broken == "config_yaml":
        (ckpt / "config.yaml").write_text("dcm: [unclosed\n")
        match = "not valid YAML"
    else:
        next(ckpt.glob("*.safetensors")).unlink()
        match = "no sdatc_modules.safetensors in"
    with pytest.raises(SdatcError, match=match):
        run(infer_cfg(clip, out, config="preview.yaml", **settings), progress=False)
    settings["checkpoint"] = str(ROOT / "assets" / "preview")  # the same run with a good setting: skipped
    settings.pop("model_config", None)
    results = run(infer_cfg(clip, out, config="preview.yaml", **settings), progress=False)
    assert [r["status"] for r in results] == ["skipped"]


def test_legal_long_names_get_short_temporary_names(tmp_path):
    """A 250-byte clip name is legal (+ '.mp4' = 254 bytes); the temporary names beside it must fit too."""
    name = "n" * 250
    tmp = temp_sibling(tmp_path / f"{name}.mp4", ".mp4")
    folder = temp_dir_sibling(tmp_path / name)
    assert len(tmp.name.encode()) <= 255 and len(folder.name.encode()) <= 255
    assert tmp.name.startswith(".") and folder.name.startswith(".")
    tmp.unlink()
    folder.rmdir()
    short = temp_sibling(tmp_path / "clip.mp4", ".mp4")
    assert short.name.startswith(".clip.mp4.")  # short names stay readable
    short.unlink()
    write_video(tmp_path / f"{name}.mp4", _noise(2, 16, 16), fps=10, crf=25)
    write_frames(tmp_path / name, _noise(2, 16, 16))
    assert VideoReader(tmp_path / f"{name}.mp4").meta.num_frames == 2 and len(list((tmp_path / name).iterdir())) == 2


def test_two_clips_of_one_name_fail_those_clips_only(tmp_path):
    """a.mp4 and a.mkv would both write a.mp4: that name fails, with both files named; b is restored."""
    clips = tmp_path / "clips"
    write_video(clips / "a.mp4", _noise(2, 16, 16), fps=10, crf=25)
    shutil.copy(clips / "a.mp4", clips / "a.mkv")
    write_video(clips / "b.mp4", _noise(2, 16, 16, seed=1), fps=10, crf=25)
    results = run(infer_cfg(clips, tmp_path / "out"), progress=False)
    assert [(r["clip"], r["status"]) for r in results] == [("a", "failed"), ("b", "done")]
    assert results[0]["error"] == ("2 clips share this name (a.mkv, a.mp4) and would write the same a.mp4: "
                                   "rename all but one")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.mp4"]
