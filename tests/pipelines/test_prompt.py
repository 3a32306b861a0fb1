"""Text conditioning (issue 24 item 12): a prompt reaches the UNet's cross-attention of both systems and changes
the output; the empty prompt is the cached embedding, bit for bit the path without prompts; fixed text, sidecar
files and a captioner plug-in through infer.py. The reference text states are computed here from a text
encoder built independently (the tiny random one: load_backbone's seed sequence; a folder: transformers'
CLIPTokenizer and CLIPTextModel on a vocabulary written in the test, since no tokenizer is available offline)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sdatc.config import load_config
from sdatc.errors import SdatcError
from sdatc.pipelines.prompt import (
    PromptConfig,
    clip_prompt,
    load_captioner,
    read_sidecar,
    sidecar_path,
)
from sdatc.pipelines.restore import PipelineConfig, RestorePipeline, TilingConfig, WindowConfig
from sdatc.pipelines.sampler import SamplerConfig
from sdatc.pipelines.tiling import tiled_batched

ROOT = Path(__file__).resolve().parents[2]
INFER = ROOT / "scripts" / "infer.py"


@pytest.fixture(scope="module")
def frames(carphone_frames):
    return np.ascontiguousarray(carphone_frames[:3, 40:56, 60:76])  # (3, 16, 16, 3) real frames


def _random_text_states(cfg, prompt: str) -> torch.Tensor:
    """The tiny random backbone's text encoder, rebuilt as load_backbone builds it (seed, UNet, VAE, then the
    text encoder), on ids BOS, bytes mapped into the vocabulary (3 + b mod (V - 3)), EOS, padding."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        UNet2DConditionModel(**cfg.unet)
        AutoencoderKL(**cfg.vae)
        text = CLIPTextModel(CLIPTextConfig(**cfg.text_encoder)).eval()
    c = text.config
    ids = [c.bos_token_id, *(3 + b % (c.vocab_size - 3) for b in prompt.encode()), c.eos_token_id]
    ids += [c.pad_token_id] * (77 - len(ids))
    with torch.no_grad():
        return text(torch.tensor([ids]))[0]  # (1, 77, D)


def _record_contexts(monkeypatch, module) -> list[torch.Tensor]:
    """Every text tensor the model's UNet driver is called with."""
    seen = []
    real = module.unet_forward

    def spy(unet, x, t, text, *args, **kwargs):
        seen.append(text.detach().clone())
        return real(unet, x, t, text, *args, **kwargs)

    monkeypatch.setattr(module, "unet_forward", spy)
    return seen


def _sdatc_pipe(model, tiling="off"):
    cfg = PipelineConfig(sampler=SamplerConfig(steps=2), window=WindowConfig(3, 2), tiling=TilingConfig(mode=tiling))
    cfg.flow.enabled = False
    return RestorePipeline(model, cfg, progress=False)


def test_sdatc_prompt_is_the_unet_context_and_changes_the_output(tiny_model, frames, monkeypatch):
    import sdatc.models.sdatc as sdatc_mod

    pipe = _sdatc_pipe(tiny_model.eval())
    seen = _record_contexts(monkeypatch, sdatc_mod)
    plain = np.stack(list(pipe.restore(iter(frames), 3)))
    assert seen and all(torch.equal(c, tiny_model.empty_prompt_embeds.expand_as(c)) for c in seen)  # as before
    seen.clear()
    empty = np.stack(list(pipe.restore(iter(frames), 3, prompt="")))
    assert np.array_equal(empty, plain)  # "" is the cached embedding: the same path, bit for bit
    assert all(torch.equal(c, tiny_model.empty_prompt_embeds.expand_as(c)) for c in seen)
    seen.clear()
    cat = np.stack(list(pipe.restore(iter(frames), 3, prompt="a cat")))
    ref = _random_text_states(tiny_model.cfg.backbone, "a cat")
    assert seen and all(c.shape == (3, 77, 32) for c in seen)
    for c in seen:
        torch.testing.assert_close(c, ref.expand_as(c), atol=1e-6, rtol=0)
    assert not torch.allclose(ref, tiny_model.empty_prompt_embeds)
    assert np.abs(cat.astype(int) - plain.astype(int)).max() > 0


def test_ultravsr_prompt_per_frame(frames, monkeypatch):
    import sdatc.models.ultravsr as ultravsr_mod
    from sdatc.models.ultravsr import UltraVSR, UltraVSRConfig
    from sdatc.pipelines.ultravsr import UltraVSRPipelineConfig, UltraVSRRunner

    monkeypatch.delenv("SDATC_SD21_PATH", raising=False)
    model = UltraVSR.from_config(load_config(UltraVSRConfig, "configs/model/ultravsr_tiny.yaml")).eval()
    cfg = UltraVSRPipelineConfig(tiling=TilingConfig(mode="off"))
    cfg.drs.estimator = "fixed"
    runner = UltraVSRRunner(model, cfg, progress=False)
    seen = _record_contexts(monkeypatch, ultravsr_mod)
    plain = np.stack(list(runner.restore(iter(frames), 3)))
    empty = np.stack(list(runner.restore(iter(frames), 3, prompt=["", "", ""])))
    assert np.array_equal(empty, plain)
    assert all(torch.equal(c, model.empty_prompt_embeds.expand_as(c)) for c in seen)
    seen.clear()
    tags = ["a cat", "a dog", "a cat"]  # tags per frame, as the release's RAM captions
    tagged = np.stack(list(runner.restore(iter(frames), 3, prompt=tags)))
    cat, dog = (_random_text_states(model.cfg.backbone, p)[0] for p in ("a cat", "a dog"))
    (c,) = seen
    torch.testing.assert_close(c, torch.stack([cat, dog, cat]), atol=1e-6, rtol=0)
    assert np.abs(tagged.astype(int) - plain.astype(int)).max() > 0
    with pytest.raises(SdatcError, match="a prompt per frame needs 3 strings, got 2"):
        list(runner.restore(iter(frames), 3, prompt=["a", "b"]))


def test_tiles_carry_their_frames_text():
    """tiled_batched's per_frame rows follow the items (tile x frame) into every call."""
    x = torch.randn(4, 2, 16, 16)
    text = torch.arange(4.0).view(4, 1, 1).expand(4, 77, 8)  # frame i's "text" is the constant i

    def fn(xt, tt):
        return xt + tt[:, 0, 0].view(-1, 1, 1, 1)

    for tile, batch in ((None, 4), (8, 3), (8, 16)):
        out = tiled_batched(fn, (x,), tile, 4 if tile else 0, batch, per_frame=(text,))
        torch.testing.assert_close(out, x + torch.arange(4.0).view(4, 1, 1, 1))


def _write_sd_folder_with_text(root: Path, cfg) -> tuple:
    """An SD folder with unet/ vae/ scheduler/ and a text encoder + CLIP tokenizer written here (10 tokens, no merges,
    no model_max_length: the text encoder's 77 positions set the length)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(3)
    UNet2DConditionModel(**cfg.unet).save_pretrained(root / "unet")
    AutoencoderKL(**cfg.vae).save_pretrained(root / "vae")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(root / "scheduler")
    text = CLIPTextModel(CLIPTextConfig(**{**cfg.text_encoder, "vocab_size": 10, "bos_token_id": 0, "eos_token_id": 1,
                                           "pad_token_id": 2})).eval()
    text.save_pretrained(root / "text_encoder")
    (root / "tok").mkdir()  # no merges: words split into these characters (the last with </w>)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, "a</w>": 3, "c": 4, "a": 5, "t</w>": 6, "d": 7, "o": 8,
             "g</w>": 9}
    (root / "tok" / "vocab.json").write_text(json.dumps(vocab))
    (root / "tok" / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(root / "tok" / "vocab.json"), str(root / "tok" / "merges.txt"), pad_token="!").save_pretrained(
        root / "tokenizer")
    return text


def test_folder_text_encoder_and_tokenizer(tiny_model_config, tmp_path, monkeypatch, write_sd_folder):
    from sdatc.config import apply_overrides
    from sdatc.models.sdatc import SDATC

    monkeypatch.delenv("SDATC_SD21_PATH", raising=False)
    text = _write_sd_folder_with_text(tmp_path / "sd", tiny_model_config.backbone)
    model = SDATC.from_config(apply_overrides(tiny_model_config, [f"backbone.pretrained={tmp_path / 'sd'}"]))
    states = model.encode_prompts(["a cat", "", "a dog"])
    with torch.no_grad():  # ids written out by hand: BOS, a, c a t, EOS, then "!" padding
        ref_cat = text(torch.tensor([[0, 3, 4, 5, 6, 1] + [2] * 71]))[0][0]
        ref_dog = text(torch.tensor([[0, 3, 7, 8, 9, 1] + [2] * 71]))[0][0]
        ref_empty = text(torch.tensor([[0, 1] + [2] * 75]))[0][0]
    torch.testing.assert_close(states[0], ref_cat, atol=1e-6, rtol=0)
    torch.testing.assert_close(states[2], ref_dog, atol=1e-6, rtol=0)
    assert torch.equal(states[1], model.empty_prompt_embeds[0])  # "" is the cached embedding ...
    torch.testing.assert_close(states[1], ref_empty, atol=1e-6, rtol=0)  # ... which is the text encoder's ""
    # a folder without text_encoder/ (a saved pipeline): one line saying what to point at
    write_sd_folder(tmp_path / "bare", tiny_model_config.backbone)
    bare = SDATC.from_config(apply_overrides(tiny_model_config, [f"backbone.pretrained={tmp_path / 'bare'}"]))
    assert torch.equal(bare.encode_prompts([""]), bare.empty_prompt_embeds)  # no text encoder needed for ""
    with pytest.raises(SdatcError) as e:
        bare.encode_prompts(["a cat"])
    assert "\n" not in str(e.value) and "no text_encoder/ and tokenizer/" in str(e.value)


def test_sidecars_and_captioner(tmp_path, capsys):
    (tmp_path / "a.mp4").write_bytes(b"")
    (tmp_path / "clip.v2").mkdir()  # a frame folder with a dot in its name: clip.v2.txt, not clip.txt
    assert sidecar_path(tmp_path / "a.mp4") == tmp_path / "a.txt"
    assert sidecar_path(tmp_path / "clip.v2") == tmp_path / "clip.v2.txt"
    (tmp_path / "a.txt").write_text("  a cat,\n sitting \n")
    assert read_sidecar(tmp_path / "a.txt") == "a cat, sitting"
    cfg = PromptConfig(sidecar=True, text="fallback")
    assert clip_prompt(cfg, tmp_path / "a.mp4") == "a cat, sitting"
    assert clip_prompt(cfg, tmp_path / "clip.v2") == "fallback"
    assert "no prompt sidecar clip.v2.txt; using prompt.text 'fallback'" in capsys.readouterr().out
    (tmp_path / "w.bin").write_text("tag")
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        cap = PromptConfig(captioner="captioner_plugin:tags", captioner_weights=str(tmp_path / "w.bin"))
        frames = np.stack([np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 200, np.uint8)])
        assert clip_prompt(cap, tmp_path / "a.mp4", lambda: frames) == ["tag dark", "tag bright"]
        with pytest.raises(SdatcError) as e:
            load_captioner(PromptConfig(captioner="captioner_plugin:tags", captioner_weights=str(tmp_path / "no.pth")))
        assert "\n" not in str(e.value) and "the tiny test captioner's weights" in str(e.value)
    finally:
        sys.path.remove(str(Path(__file__).parent))
    for bad, match in ((dict(captioner="nomodule"), "module:function"),
                       (dict(captioner="m:f", sidecar=True), "leave prompt.sidecar and prompt.text unset"),
                       (dict(captioner_weights="x"), "without prompt.captioner")):
        with pytest.raises(ValueError, match=match):
            PromptConfig(**bad)
    assert PromptConfig().empty and not PromptConfig(text="x").empty


# ---------------------------------------------------------------------------- through scripts/infer.py

STEPS = ["pipeline.sampler.steps=1", "pipeline.flow.enabled=false", "copy_audio=false", "save_frames=true"]


def _infer(*args):
    cmd = [sys.executable, str(INFER), "--config", str(ROOT / "configs" / "infer" / "tiny.yaml"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def in_process():
    """``in_process(clip, prompt)``: what infer.py should write, computed here with its config and model."""
    from sdatc.data.video import read_video
    from sdatc.inference import InferConfig, build_model
    from sdatc.pipelines.sdatc_pipeline import SDATCPipeline

    cfg = load_config(InferConfig, "configs/infer/tiny.yaml", STEPS)
    pipe = SDATCPipeline(build_model(cfg), cfg.pipeline, progress=False)
    return lambda clip, prompt: pipe(read_video(clip), prompt=prompt).astype(int)


@pytest.fixture(scope="module")
def clips(tmp_path_factory, carphone_frames):
    """A video file without a sidecar and a frame folder with one (3 frames of 16 x 16 each)."""
    from sdatc.data.video import write_frames, write_video

    root = tmp_path_factory.mktemp("prompted")
    (root / "in").mkdir()
    write_video(root / "in" / "car.mp4", carphone_frames[:3, 40:56, 60:76], fps=25, crf=0)
    write_frames(root / "in" / "shot", carphone_frames[3:6, 40:56, 60:76])
    (root / "in" / "shot.txt").write_text("a cat\n")  # beside the folder shot/
    return root


def test_infer_sidecar_and_fixed_text(clips, in_process, monkeypatch):
    """One infer.py run: the frame folder has its sidecar, the video file has none and gets prompt.text (with
    a note). Each output is the in-process pipeline's with that prompt (up to one level: thread counts may
    round differently), not the empty prompt's."""
    from sdatc.data.video import read_video

    monkeypatch.delenv("SDATC_SD21_PATH", raising=False)
    car, shot = clips / "in" / "car.mp4", clips / "in" / "shot"
    p = _infer("--input", clips / "in", "--output", clips / "out", "prompt.sidecar=true", "prompt.text=a dog", *STEPS)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "2 done" in p.stdout and "note: car.mp4: no prompt sidecar car.txt; using prompt.text 'a dog'" in p.stdout
    assert "skipped 1 entries" not in p.stdout  # shot.txt is a sidecar, not a stray file
    for name, clip, prompt in (("shot", shot, "a cat"), ("car", car, "a dog")):
        ours = read_video(clips / "out" / name).astype(int)  # the lossless PNGs
        assert np.abs(ours - in_process(clip, prompt)).max() <= 1, name
        assert np.abs(ours - in_process(clip, None)).max() > 1, name


def test_infer_missing_captioner_weights_is_one_line(clips, tmp_path, capsys, monkeypatch):
    """infer.py's main as the script runs it (in this process: no second interpreter start)."""
    from sdatc.errors import run_cli

    spec = importlib.util.spec_from_file_location("infer_script", INFER)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    with pytest.raises(SystemExit) as e:
        run_cli(script.main, ["--config", "configs/infer/tiny.yaml", "--input", str(clips / "in" / "car.mp4"),
                              "--output", str(tmp_path / "o"), "prompt.captioner=captioner_plugin:tags",
                              f"prompt.captioner_weights={tmp_path / 'ram_plus.pth'}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and len(err.splitlines()) == 1, err
    assert err.startswith("error: prompt.captioner captioner_plugin:tags needs its weights") and "ram_plus.pth" in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    shutil.rmtree(tmp_path / "o", ignore_errors=True)
