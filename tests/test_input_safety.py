"""Inputs are never overwritten or deleted (issue 23.1): every combination of input kind (video file, frame
folder, folder of clips), output place (equal, parent, child, sibling, through a symlink, through ``..``),
``save_frames`` and ``overwrite``; the sha256 of every input file is checked after each run. Runs in process
with ``mode=bicubic`` on 3-frame 32x24 clips, so the whole matrix takes seconds."""

import dataclasses
import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdatc.config import load_config
from sdatc.data.video import VideoReader, write_frames, write_video
from sdatc.errors import SdatcError
from sdatc.inference import InferConfig, run

ROOT = Path(__file__).resolve().parents[1]
BICUBIC = ROOT / "configs" / "infer" / "bicubic.yaml"


def _frames(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (3, 24, 32, 3), dtype=np.uint8)


def make_input(base: Path, kind: str) -> Path:
    """``file``: base/DIR/clip.mp4; ``frames``: base/SHOTS/clipf/*.png; ``folder``: base/clips holding a frame
    folder named ``clips`` too (so an output folder beside ``clips`` with save_frames would land on it) and an mp4."""
    if kind == "file":
        return write_video(base / "DIR" / "clip.mp4", _frames(0), fps=10, crf=25)
    if kind == "frames":
        return write_frames(base / "SHOTS" / "clipf", _frames(1))
    write_frames(base / "clips" / "clips", _frames(2))
    write_video(base / "clips" / "a.mp4", _frames(3), fps=10, crf=25)
    return base / "clips"


def digests(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def output_for(base: Path, src: Path, where: str) -> Path:
    if where == "equal":
        return src
    if where == "parent":
        return src.parent
    if where == "child":
        return src / "out"
    if where == "sibling":
        return src.parent / "restored"
    if where == "symlink":  # a link to the input's parent folder
        link = base / "link"
        link.symlink_to(src.parent, target_is_directory=True)
        return link
    if where == "dotdot":  # the parent, spelled through a sibling and ".."
        (src.parent / "restored").mkdir(exist_ok=True)
        return src.parent / "restored" / ".."
    raise ValueError(where)


def refused(kind: str, where: str, save_frames: bool) -> bool:
    """The rule, written out case by case: is this run refused?"""
    if where in ("equal", "child"):  # the output is the input, inside it, or below a file
        return True
    if where == "sibling":
        return False
    # parent, symlink and dotdot all name the input's parent folder
    if kind == "file":
        return True  # DIR/clip.mp4 would be the input clip itself
    if kind == "frames":
        return save_frames  # SHOTS/clipf would be the input frame folder; SHOTS/clipf.mp4 is a new file
    return save_frames  # base/clips (frames of clip "clips") would hold the whole input folder


def infer_cfg(src: Path, out: Path, **kw) -> InferConfig:
    cfg = load_config(InferConfig, BICUBIC)
    return dataclasses.replace(cfg, input=str(src), output=str(out), copy_audio=False, output_preset="ultrafast", **kw)


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("save_frames", [False, True])
@pytest.mark.parametrize("where", ["equal", "parent", "child", "sibling", "symlink", "dotdot"])
@pytest.mark.parametrize("kind", ["file", "frames", "folder"])
def test_inputs_are_never_written(tmp_path, kind, where, save_frames, overwrite):
    src = make_input(tmp_path, kind)
    before = digests(src)
    out = output_for(tmp_path, src, where)
    tree = sorted(map(str, tmp_path.rglob("*")))
    cfg = infer_cfg(src, out, save_frames=save_frames, overwrite=overwrite)
    if refused(kind, where, save_frames):
        with pytest.raises(SdatcError, match="input") as e:
            run(cfg, progress=False)
        assert "\n" not in str(e.value)
        assert sorted(map(str, tmp_path.rglob("*"))) == tree, "a refused run created files"
    else:
        for attempt in range(2):  # the second run finds every output there: skipped, or replaced with overwrite
            results = run(cfg, progress=False)
            statuses = {r["status"] for r in results}
            assert statuses == ({"skipped"} if attempt and not overwrite else {"done"}), results
            assert digests(src) == before, "an input changed"
        names = ["clips", "a"] if kind == "folder" else [src.stem if kind == "file" else src.name]
        for name in names:
            assert VideoReader(Path(out) / f"{name}.mp4").meta.num_frames == 3
            if (Path(out) / name).resolve() != src.resolve():  # (with frames beside: the input itself)
                assert (Path(out) / name).is_dir() == save_frames
    assert digests(src) == before, "an input changed"


def test_an_output_hard_linked_or_linked_to_the_input_is_refused(tmp_path):
    """Identity, not only names: the input frame folder reached through a symlinked output entry, and an mp4
    output that is a hard link of the input clip."""
    src = make_input(tmp_path, "frames")
    before = digests(src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "clipf").symlink_to(src, target_is_directory=True)
    with pytest.raises(SdatcError, match="is the input clip"):
        run(infer_cfg(src, out, save_frames=True, overwrite=True), progress=False)
    clip = make_input(tmp_path, "file")
    os.link(clip, out / "clip.mp4")
    clip_digest = digests(clip)
    with pytest.raises(SdatcError, match="is the input clip"):
        run(infer_cfg(clip, out, overwrite=True), progress=False)
    assert digests(src) == before and digests(clip) == clip_digest


def test_existing_frames_folder_follows_overwrite(tmp_path):
    """``overwrite`` governs the frames folder as it does the mp4: without it an existing output is kept and
    only the missing ones are written; with it both are replaced."""
    src = make_input(tmp_path, "file")
    out = tmp_path / "out"
    run(infer_cfg(src, out), progress=False)  # the mp4 only
    mp4 = digests(out / "clip.mp4")
    mtime = (out / "clip.mp4").stat().st_mtime_ns
    results = run(infer_cfg(src, out, save_frames=True), progress=False)
    assert [r["status"] for r in results] == ["done"]
    assert digests(out / "clip.mp4") == mp4 and (out / "clip.mp4").stat().st_mtime_ns == mtime  # kept
    assert len(list((out / "clip").glob("*.png"))) == 3
    (out / "clip" / "mine.txt").write_text("a file of the user's")
    (out / "clip.mp4").unlink()
    run(infer_cfg(src, out, save_frames=True), progress=False)  # the mp4 again; the frames folder kept
    assert (out / "clip" / "mine.txt").exists() and (out / "clip.mp4").exists()
    assert [r["status"] for r in run(infer_cfg(src, out, save_frames=True), progress=False)] == ["skipped"]
    run(infer_cfg(src, out, save_frames=True, overwrite=True), progress=False)
    assert not (out / "clip" / "mine.txt").exists() and len(list((out / "clip").glob("*.png"))) == 3
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left"


def _infer_main():
    spec = importlib.util.spec_from_file_location("infer_script", ROOT / "scripts" / "infer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("case", ["frames_into_parent", "clip_into_its_folder"])
def test_issue_reproductions_exit_non_zero_with_one_line(tmp_path, case, capsys):
    """The two commands of issue 23 that destroyed inputs, through infer.py's main and run_cli: exit 2, one
    line, before the model loads, input unchanged."""
    from sdatc.errors import run_cli

    src = make_input(tmp_path, "frames" if case == "frames_into_parent" else "file")
    before = digests(src)
    extra = ["save_frames=true"] if case == "frames_into_parent" else ["overwrite=true"]
    with pytest.raises(SystemExit) as e:
        run_cli(_infer_main(), ["--config", str(BICUBIC), "--input", str(src), "--output", str(src.parent), *extra])
    out, err = capsys.readouterr()
    assert e.value.code == 2, out + err
    assert err.strip().count("\n") == 0 and "is the input clip" in err and "model:" not in out
    assert digests(src) == before


def test_issue_reproduction_as_a_user_types_it(tmp_path):
    """The first command of issue 23 in a new process (exit status and stderr as a shell sees them)."""
    src = make_input(tmp_path, "frames")
    before = digests(src)
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "infer.py"), "--config", str(BICUBIC), "--input",
                        str(src), "--output", str(src.parent), "save_frames=true"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr and "is the input clip" in p.stderr
    assert digests(src) == before


def test_input_reached_through_a_bind_mount_is_refused(tmp_path):
    """The output folder is a bind mount of the input's parent (same folder, other path: only the identity
    of the folders tells): refused. In a private mount namespace (unshare -m, as root); skipped elsewhere."""
    import shutil

    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("a bind mount needs root and unshare (util-linux)")
    src = make_input(tmp_path, "frames")
    before = digests(src)
    view = tmp_path / "view"
    view.mkdir()
    code = ("from tests.test_input_safety import infer_cfg; from sdatc.inference import run; "
            f"from pathlib import Path; run(infer_cfg(Path('{src}'), Path('{view}'), save_frames=True, "
            "overwrite=True), progress=False)")
    script = f"mount --bind {src.parent} {view} && {sys.executable} -c \"{code}\""
    p = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    if "mount:" in p.stderr:
        pytest.skip(f"bind mount not permitted here ({p.stderr.strip()[:120]})")
    assert p.returncode != 0 and f"output {view}/clipf is the input clip {src}" in p.stderr, p.stderr[-2000:]
    assert digests(src) == before
