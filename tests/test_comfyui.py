"""The ComfyUI node pack (comfyui/, sdatc/comfy_nodes.py) called as ComfyUI calls it, with ComfyUI-format
IMAGE tensors (B, H, W, C) float in [0, 1]; ComfyUI itself is not installed: a fake ``comfy`` package in
sys.modules stands in for its progress bar and interruption check."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
import types

import numpy as np
import pytest
import torch

from sdatc import comfy_nodes as cn
from sdatc.config import REPO_ROOT


def as_image(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frames).float().div(255)  # (B, H, W, 3) in [0, 1]


@pytest.fixture(scope="module")
def tiny_sdatc():
    return cn.SDATCLoadPipeline().load("sdatc-tiny (random weights)", "fp32", "cpu")[0]


@pytest.fixture(scope="module")
def preview():
    return cn.SDATCLoadPipeline().load("preview", "auto", "cpu")[0]


class Interrupted(Exception):
    pass


@pytest.fixture
def fake_comfy(monkeypatch):
    """comfy.utils.ProgressBar and comfy.model_management.throw_exception_if_processing_interrupted, recorded;
    ``state['interrupt_after']`` checks pass, then the check raises as ComfyUI's does on cancel."""
    state = {"bars": [], "checks": 0, "interrupt_after": None}

    class ProgressBar:
        def __init__(self, total):
            self.total, self.done = total, 0
            state["bars"].append(self)

        def update(self, value):
            self.done += value

    def throw_exception_if_processing_interrupted():
        state["checks"] += 1
        if state["interrupt_after"] is not None and state["checks"] > state["interrupt_after"]:
            raise Interrupted("cancelled")

    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    mm = types.ModuleType("comfy.model_management")
    utils.ProgressBar = ProgressBar
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    comfy.utils, comfy.model_management = utils, mm
    for name, mod in (("comfy", comfy), ("comfy.utils", utils), ("comfy.model_management", mm)):
        monkeypatch.setitem(sys.modules, name, mod)
    return state


def test_pack_exports_the_nodes():
    """comfyui/__init__.py, loaded by path as ComfyUI loads custom_nodes/<pack>: every node is well formed."""
    spec = importlib.util.spec_from_file_location("sdatc_comfyui_pack", REPO_ROOT / "comfyui/__init__.py")
    pack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack)
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS) == {
        "SDATCLoadPipeline", "SDATCRestoreFrames", "SDATCDegradationScore", "SDATCLoadVideo"}
    for cls in pack.NODE_CLASS_MAPPINGS.values():
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional"} and callable(getattr(cls(), cls.FUNCTION))
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)


def test_sdatc_never_imports_comfyui_at_module_level():
    """No module of the sdatc package imports comfy (or anything of ComfyUI) at its top level."""
    for path in (REPO_ROOT / "sdatc").rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("comfy", "comfy_extras", "nodes") for n in names), (path, names)


def test_restore_equals_sdatc_pipeline(tiny_sdatc, carphone_frames):
    """IMAGE in, IMAGE out: (B, 4H, 4W, 3) float in [0, 1], exactly SDATCPipeline's frames on the same
    8-bit frames, with the model's windows and with other windows (overlaps blended)."""
    from sdatc.pipelines.config import WindowConfig
    from sdatc.pipelines.sdatc_pipeline import SDATCPipeline

    frames = np.ascontiguousarray(carphone_frames[:5, 40:56, 60:84])  # (5, 16, 24, 3): two windows of 3, one blended
    node = cn.SDATCRestoreFrames()
    out = node.restore(tiny_sdatc, as_image(frames), 2, 0.5, "default", 7, 0.0, 3, 1)[0]
    assert out.shape == (5, 64, 96, 3) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1 and out.std() > 0.01
    config = tiny_sdatc.infer.pipeline
    pipe = SDATCPipeline(tiny_sdatc.model, type(config)(**{**vars(config), "window": WindowConfig(3, 2)}))
    ref = pipe(frames, num_inference_steps=2, generator=torch.Generator().manual_seed(7), cfw_weight=0.5)
    assert np.array_equal((out * 255).round().byte().numpy(), ref)


def test_preview_restore_reports_progress_and_honours_cancel(preview, carphone_frames, fake_comfy):
    """ComfyUI's progress bar advances once per frame; a cancel stops the node before the batch is done."""
    images = as_image(np.ascontiguousarray(carphone_frames[:6, :32, :48]))
    out = cn.SDATCRestoreFrames().restore(preview, images, 50, 0.75, "default", 0, 0.0, 0, 0)[0]
    assert out.shape == (6, 128, 192, 3) and 0 <= out.min() and out.max() <= 1
    bar = fake_comfy["bars"][-1]
    assert (bar.total, bar.done) == (6, 6) and fake_comfy["checks"] >= 6
    fake_comfy.update(checks=0, interrupt_after=3)
    with pytest.raises(Interrupted):
        cn.SDATCRestoreFrames().restore(preview, images, 50, 0.75, "default", 0, 0.0, 0, 0)
    assert fake_comfy["bars"][-1].done < 6


def test_restore_without_comfyui_and_bad_images(preview, carphone_frames):
    """Outside ComfyUI the hooks do nothing; a grey IMAGE (C=1) is restored as RGB; a wrong shape is one line."""
    grey = as_image(np.ascontiguousarray(carphone_frames[:2, :16, :16, :1]))
    out = cn.restore_frames(preview, grey)
    assert out.shape == (2, 64, 64, 3)
    with pytest.raises(RuntimeError, match=r"^sdatc: images must be a ComfyUI IMAGE batch"):
        cn.SDATCRestoreFrames().restore(preview, torch.zeros(16, 16, 3), 50, 0.75, "default", 0, 0.0, 0, 0)


def test_degradation_score_and_load_video():
    """The demo clip's frames (B, H, W, 3) in [0, 1]; its d from the bitstream (x264 crf 30 -> 0.5 by DRS's table)."""
    images, fps = cn.SDATCLoadVideo().load("assets/demo.mp4", 3)
    assert images.shape == (3, 180, 320, 3) and fps == 25.0 and 0 <= images.min() and images.max() <= 1
    d, how = cn.SDATCDegradationScore().score(images, "bitstream", str(REPO_ROOT / "assets/demo.mp4"))
    assert (d, how) == (0.5, "x264 crf=30")
    with pytest.raises(RuntimeError, match="needs video_path"):
        cn.SDATCDegradationScore().score(images, "bitstream")


def test_workflow_json_matches_the_nodes():
    """comfyui/workflow_api.json: every node exists, gets its required inputs, and each link points at an
    output of the type the input takes."""
    workflow = json.loads((REPO_ROOT / "comfyui/workflow_api.json").read_text())
    core = {"PreviewImage": ({"images": ("IMAGE",)}, ())}
    for node in workflow.values():
        cls = cn.NODE_CLASS_MAPPINGS.get(node["class_type"])
        required = cls.INPUT_TYPES()["required"] if cls else core[node["class_type"]][0]
        assert set(required) <= set(node["inputs"]), node
        for name, value in node["inputs"].items():
            if isinstance(value, list):  # a link [node id, output index]
                src = cn.NODE_CLASS_MAPPINGS[workflow[value[0]]["class_type"]]
                assert src.RETURN_TYPES[value[1]] == required[name][0], (name, value)
            elif cls and name in required and isinstance(required[name][0], list):
                assert value in required[name][0], (name, value)


def test_ultravsr_restore_with_a_given_d(carphone_frames):
    """UltraVSR (tiny, random weights) through the node: d given skips the estimator; x4, in [0, 1]."""
    pipe = cn.SDATCLoadPipeline().load("ultravsr-tiny (random weights)", "fp32", "cpu")[0]
    images = as_image(np.ascontiguousarray(carphone_frames[:3, :16, :16]))
    out = cn.SDATCRestoreFrames().restore(pipe, images, 50, 0.75, "wavelet", 0, 0.4, 0, 0)[0]
    assert out.shape == (3, 64, 64, 3) and 0 <= out.min() and out.max() <= 1
    assert pipe.infer.mode == "ultravsr"
