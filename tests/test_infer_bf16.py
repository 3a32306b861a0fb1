"""dtype=bf16 on the CPU (torch's CPU autocast): infer.py's tiny SDATC and the preview DCM on a small real clip,
against fp32, and bf16 seen inside every stage. fp16 on the CPU stays an error.

Tolerances (uint8 levels, PNG frames, 5 frames 256x144; measured on an AVX2 CPU with torch 2.14):

* tiny SDATC (random weights, 2 steps): bf16 vs fp32 mean |diff| 0.33, max 5, 32 % of values differ;
  asserted mean in (0.05, 1.0], max <= 10.
* preview DCM (assets/preview): mean 0.23, max 2, 23 % differ; asserted mean in (0.05, 0.75], max <= 5.

Why: bf16 keeps 8 significant bits, so a value in [0.5, 1) is rounded to a multiple of 2^-8, about one
uint8 level. The last conv runs in bf16, so that one rounding alone gives a mean error of about 0.25
level and a max of 0.5-1; the bounds leave room (3-4x on the mean, 2x on the max) for the error carried
through the earlier layers, and the lower bound proves bf16 really ran (fp32 vs fp32 is exactly 0).
"""

import contextlib
import dataclasses
import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from sdatc import inference
from sdatc.config import REPO_ROOT, load_config
from sdatc.data.video import read_video
from sdatc.errors import SdatcError
from sdatc.inference import InferConfig, pick_device

TINY = REPO_ROOT / "configs" / "infer" / "tiny.yaml"
PREVIEW = REPO_ROOT / "configs" / "infer" / "preview.yaml"
# the stages the pipeline autocasts, as the model's module names
SDATC_STAGES = ("dcm", "vae.encoder", "guidance", "unet", "vae.decoder", "cfw")


def restore(config, clip, out, dtype: str, hooks: bool = False) -> tuple[np.ndarray, str, dict[str, set]]:
    """Run infer.py's ``run`` in-process; returns the frames (T, H, W, 3) as int, the printed text, and
    when ``hooks``, the output dtypes of every Conv2d / Linear per stage."""
    cfg = load_config(InferConfig, config, [f"input={clip}", f"output={out}", f"dtype={dtype}", "save_frames=true"])
    seen: dict[str, set] = {}
    build = inference.build_model

    def build_with_hooks(c):
        model = build(c)
        for name, m in model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                stage = "cfw" if ".mid.cfw." in name else next(  # CFW sits inside the VAE decoder
                    (s for s in SDATC_STAGES if name == s or name.startswith(s + ".")), "other")
                m.register_forward_hook(lambda _m, _a, y, s=stage: seen.setdefault(s, set()).add(y.dtype))
        return model

    text = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(text):
        if hooks:
            mp.setattr(inference, "build_model", build_with_hooks)
        results = inference.run(cfg, progress=False)
    assert [r["status"] for r in results] == ["done"], results
    return read_video(out / clip.stem).astype(int), text.getvalue(), seen


def diff_stats(a: np.ndarray, b: np.ndarray) -> tuple[float, int, float]:
    d = np.abs(a - b)
    return float(d.mean()), int(d.max()), float((d > 0).mean())


@pytest.fixture(scope="module")
def tiny_runs(lq_small_clip, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16")
    return {d: restore(TINY, lq_small_clip, out / d, d, hooks=d == "bf16") for d in ("fp32", "bf16")}


def test_tiny_sdatc_bf16_close_to_fp32(tiny_runs):
    (fp32, text32, _), (bf16, text16, _) = tiny_runs["fp32"], tiny_runs["bf16"]
    assert fp32.shape == bf16.shape == (5, 144, 256, 3)
    mean, mx, frac = diff_stats(fp32, bf16)
    print(f"tiny SDATC bf16 vs fp32: mean {mean:.3f}, max {mx}, {frac:.1%} differ")
    assert 0.05 < mean <= 1.0 and frac > 0.05, (mean, frac)  # bf16 really ran
    assert mx <= 10, mx
    assert "model: SDATC" in text16 and "bf16 weights and autocast on cpu" in text16
    assert "fp32 on cpu" in text32


def test_bf16_reaches_every_stage(tiny_runs):
    _, _, seen = tiny_runs["bf16"]
    assert set(SDATC_STAGES) <= set(seen), seen
    for stage in SDATC_STAGES:  # the VAE decoder too: only fp16 keeps it in fp32
        assert seen[stage] == {torch.bfloat16}, (stage, seen[stage])
    assert set().union(*seen.values()) == {torch.bfloat16}, seen  # CAPM, STAM, quant convs: no fp32 left


def test_preview_dcm_bf16_close_to_fp32(lq_small_clip, tmp_path):
    fp32, _, _ = restore(PREVIEW, lq_small_clip, tmp_path / "fp32", "fp32")
    bf16, text, seen = restore(PREVIEW, lq_small_clip, tmp_path / "bf16", "bf16", hooks=True)
    assert "model: DCM only" in text and "bf16 weights and autocast on cpu" in text
    assert seen == {"other": {torch.bfloat16}}  # the DCM alone: its modules are the model's top level
    mean, mx, frac = diff_stats(fp32, bf16)
    print(f"preview DCM bf16 vs fp32: mean {mean:.3f}, max {mx}, {frac:.1%} differ")
    assert 0.05 < mean <= 0.75 and frac > 0.05, (mean, frac)
    assert mx <= 5, mx


def test_dtype_choice_on_the_cpu():
    def pick(dtype: str):
        return pick_device(dataclasses.replace(InferConfig(), dtype=dtype), SimpleNamespace(device=torch.device("cpu")))

    assert pick("auto") == (torch.device("cpu"), torch.float32)
    assert pick("bf16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(SdatcError, match="dtype fp16 needs a GPU; use bf16 .* or fp32 on the CPU"):
        pick("fp16")


def test_fp16_pipelines_on_the_cpu_are_errors():
    from sdatc.pipelines.config import PipelineConfig
    from sdatc.pipelines.dcm_pipeline import DCMPipeline

    with pytest.raises(SdatcError, match="float16 autocast needs a GPU"):
        DCMPipeline(nn.Identity(), PipelineConfig(), device="cpu", dtype=torch.float16)


def test_weights_cast_once_at_load():
    """bf16 runs hold bf16 weights (no per-call re-cast under autocast); fp16 keeps the VAE decoder fp32."""
    from sdatc.models.sdatc import SDATC, ModelConfig
    from sdatc.pipelines.config import cast_weights

    def tiny():
        return SDATC.from_config(load_config(ModelConfig, "configs/model/sdatc_tiny.yaml"))

    model = cast_weights(tiny(), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    half = cast_weights(tiny(), torch.float16)
    assert {p.dtype for p in half.vae.decoder.parameters()} == {torch.float32}  # with STAM, CAPM, CFW in it
    assert {p.dtype for p in half.unet.parameters()} == {torch.float16}
    assert {p.dtype for p in half.vae.encoder.parameters()} == {torch.float16}
    fp32 = tiny()
    assert cast_weights(fp32, torch.float32) is fp32 and {p.dtype for p in fp32.parameters()} == {torch.float32}
