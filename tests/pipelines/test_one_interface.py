"""Every pipeline infer.py builds streams a clip through the same ``stream(frames, num_frames, prompt=, source=)``,
so inference.py needs no dispatch over pipeline classes; the weights are cast once, by the pipeline."""

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

import sdatc.inference as inference
from sdatc.config import load_config
from sdatc.inference import InferConfig, build_model, make_pipeline

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("config", ["bicubic", "preview", "tiny", "ultravsr_tiny"])
def test_each_mode_streams_frames_through_the_same_interface(config, tmp_path):
    cfg = load_config(InferConfig, ROOT / "configs" / "infer" / f"{config}.yaml",
                      ["pipeline.flow.enabled=false", "ultravsr.drs.estimator=fixed", "ultravsr.window.length=2",
                       "ultravsr.window.stride=2"])
    pipe = make_pipeline(build_model(cfg), cfg, torch.device("cpu"), torch.float32, progress=False)
    frames = np.random.default_rng(0).integers(0, 256, (2, 16, 24, 3), dtype=np.uint8)
    out = list(pipe.stream(iter(frames), 2, prompt=None, source=tmp_path / "clip.mp4"))
    assert [f.shape for f in out] == [(64, 96, 3)] * 2 and all(f.dtype == np.uint8 for f in out)
    assert pipe.last_drs is None or pipe.last_drs[2].startswith("fixed")  # UltraVSR: d from its DRS
    assert inference.describe_model(cfg, pipe.model).startswith("model: ")  # the line infer.py prints


def test_inference_dispatches_on_no_pipeline_class():
    tree = ast.parse(inspect.getsource(inference))
    checks = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Call)
              and getattr(n.func, "id", None) == "isinstance" and "Pipeline" in ast.unparse(n)]
    assert checks == []


def test_the_pipeline_casts_the_weights_once_and_cast_false_keeps_them(tiny_model):
    from sdatc.pipelines.sdatc_pipeline import SDATCPipeline

    SDATCPipeline(tiny_model, torch_dtype=torch.bfloat16, cast=False, progress=False)
    assert {p.dtype for p in tiny_model.parameters()} == {torch.float32}  # the trainer's validation: as they were
    SDATCPipeline(tiny_model, torch_dtype=torch.bfloat16, progress=False)
    assert {p.dtype for p in tiny_model.unet.parameters()} == {torch.bfloat16}
