"""The compile speed path (sdatc/pipelines/hardware.py): the denoisers trace into one graph with no graph break,
the speed path keeps outputs, the compiled denoiser equals the eager one and compiles once per shape.

Cost on 2 CPU cores: each Dynamo trace of a tiny denoiser takes about 10-15 s (no code is generated);
an inductor compile takes minutes (C++), so those checks are ``slow``.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from sdatc.config import load_config
from sdatc.errors import SdatcError
from sdatc.models.sdatc import SDATC, ModelConfig
from sdatc.models.ultravsr import UltraVSR, UltraVSRConfig
from sdatc.pipelines.hardware import cpp_compiler, speed_up

SDATC_TINY = "configs/model/sdatc_tiny.yaml"
ULTRAVSR_TINY = "configs/model/ultravsr_tiny.yaml"


def _perturb(model, scale=0.05):
    """Non-zero new modules (every output layer starts at zero), so they take part in the outputs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture(scope="module")
def sdatc_model():
    mp = pytest.MonkeyPatch()
    mp.delenv("SDATC_SD21_PATH", raising=False)
    try:
        torch.manual_seed(0)
        yield _perturb(SDATC.from_config(load_config(ModelConfig, SDATC_TINY)).eval())
    finally:
        mp.undo()


def _uvsr(overrides=()):
    mp = pytest.MonkeyPatch()
    mp.delenv("SDATC_SD21_PATH", raising=False)
    try:
        torch.manual_seed(0)
        return _perturb(UltraVSR.from_config(load_config(UltraVSRConfig, ULTRAVSR_TINY, list(overrides))).eval())
    finally:
        mp.undo()


def _inputs(n=2, h=8, w=12):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 4, h, w, generator=g), torch.full((n,), 500, dtype=torch.long),
            torch.randn(n, 4, h, w, generator=g))


def _assert_one_graph(fn, *args, **kwargs):
    torch._dynamo.reset()
    with torch.no_grad():
        e = torch._dynamo.explain(fn)(*args, **kwargs)
    reasons = "\n".join(f"{b.reason} at {b.user_stack[-1] if b.user_stack else '?'}" for b in e.break_reasons)
    assert e.graph_break_count == 0 and e.graph_count == 1, (
        f"{e.graph_count} graphs, {e.graph_break_count} breaks:\n{reasons}")


def test_sdatc_denoiser_is_one_graph(sdatc_model):
    z_t, t, z_c = _inputs()
    _assert_one_graph(sdatc_model.predict, z_t, t, z_c)


@pytest.mark.slow  # ~15 s; the SDATC denoiser's check above runs in CI
def test_ultravsr_one_step_is_one_graph():
    """Our code on UltraVSR's path (drivers, Sites, RTS); peft's LoRA layers and TAI chunks: the slow test."""
    model = _uvsr(["enabled.lora_unet=false", "enabled.lora_vae=false"])
    z = torch.randn(3, 4, 8, 12)
    _assert_one_graph(model.predict, z, torch.tensor(250), 3)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [None, 1])
def test_ultravsr_with_lora_and_chunks_is_one_graph(chunk):
    """About a minute a case on 2 cores (peft's layers are long to trace; chunks unroll the spatial blocks)."""
    model = _uvsr()
    z = torch.randn(2, 4, 8, 12)
    _assert_one_graph(model.predict, z, torch.tensor(250), 2, chunk)


def test_plain_speed_path_keeps_outputs(sdatc_model):
    """channels_last changes convolution kernels only: float rounding (observed ~1e-6 on outputs of ~1)."""
    z_t, t, z_c = _inputs()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with torch.no_grad():
        ref = sdatc_model.predict(z_t, t, z_c)
        fn = speed_up(sdatc_model, "cpu", compile=False)
        assert sdatc_model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        out = fn(z_t, t, z_c)
        out_int = fn(z_t, 500, z_c)  # a number as the timestep, as predict takes it
    assert not fn.compiled
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == tf32  # CPU: untouched
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()
    assert torch.equal(out, out_int)


def test_refuses_cuda_graph_modes(sdatc_model):
    with pytest.raises(SdatcError, match="CUDA graphs"):
        speed_up(sdatc_model, "cpu", compile=True, mode="reduce-overhead")


@pytest.mark.slow
def test_compiles_once_per_shape_and_per_autocast(sdatc_model):
    """Dynamo only (the traced graph runs eagerly): timesteps as numbers or tensors and views of tiles reuse the
    graph; a new shape or autocast compiles again. About 4 traces of ~12 s."""
    z_t, t, z_c = _inputs(h=16, w=16)
    cnt = CompileCounter()
    torch._dynamo.reset()
    fn = speed_up(sdatc_model, "cpu", compile=True, backend=cnt)
    with torch.no_grad():
        ref = sdatc_model.predict(z_t, t, z_c)
        assert torch.equal(fn(z_t, t, z_c), ref)
        fn(z_t, 10, z_c)
        fn(z_t[..., :8, :8], t, z_c[..., 8:, 8:])  # tiles: views of a larger latent
        fn(z_t[..., 8:, 8:], torch.tensor(999), z_c[..., :8, 8:])
        assert cnt.frame_count == 2, cnt.frame_count  # 16x16 and the 8x8 tiles
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_bf16 = sdatc_model.predict(z_t, t, z_c)
            out_bf16 = fn(z_t, t, z_c)
        assert cnt.frame_count == 3  # the autocast state is guarded: its own graph
        assert torch.equal(out_bf16, ref_bf16)


@pytest.mark.slow
def test_compiled_equals_eager(sdatc_model):
    """Inductor on the CPU: max |diff| <= 1e-4 on outputs of magnitude ~1 (observed ~2e-6). The compile takes
    minutes on 2 cores (C++), about 30 s with inductor's on-disk cache warm."""
    if cpp_compiler() is None:
        pytest.skip("inductor's CPU backend needs a C++ compiler (g++ or $CXX) and none is installed")
    z_t, t, z_c = _inputs()
    torch._dynamo.reset()
    with torch.no_grad():
        ref = [sdatc_model.predict(z_t, t, z_c), sdatc_model.predict(z_t, torch.full_like(t, 20), z_c)]
        fn = speed_up(sdatc_model, "cpu", compile=True)
        out = [fn(z_t, t, z_c), fn(z_t, 20, z_c)]
    assert fn.compiled
    for o, r in zip(out, ref, strict=True):
        assert torch.allclose(o, r, atol=1e-4, rtol=0), (o - r).abs().max()
    assert not torch.allclose(ref[0], ref[1], atol=1e-3)  # the timestep reaches the graph as an input
