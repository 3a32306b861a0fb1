"""Parameter and FLOP reports for ``scripts/inspect_model.py``."""

from __future__ import annotations

import torch
from torch.utils import flop_counter

from sdatc.models.dcm_fast import dcm_inference


def flop_counter_mode() -> flop_counter.FlopCounterMode:
    """torch's FLOP counter, also counting the CPU flash-attention kernel as its CUDA siblings are."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and op not in flop_counter.flop_registry:  # sdpa_flop is registered already shape-wrapped
        flop_counter.register_flop_formula(op, get_raw=True)(flop_counter.sdpa_flop)
    return flop_counter.FlopCounterMode(display=False)


def count_flops(cfg, out_h: int = 720, out_w: int = 1280) -> dict:
    """FLOPs of each stage for one (out_h, out_w) output frame, counted on the meta device.

    The LR frame is (out_h/4, out_w/4); the denoising step runs at the padded latent the pipeline
    uses (LR padded to the model's pad multiple), and so do the VAE encode and decode (the
    pipeline crops the decoded frame back to the output size)."""
    from sdatc.models.sdatc import SDATC

    with torch.device("meta"):
        model = SDATC.from_config(cfg)
    s = cfg.upscale
    h, w = out_h // s, out_w // s
    m = model.pad_multiple
    hp, wp = h + (-h % m), w + (-w % m)
    lat = 2 ** (len(model.vae.config.block_out_channels) - 1)
    meta = dict(device="meta")
    out = {"frame": [out_h, out_w], "lr": [h, w], "lr_padded": [hp, wp]}

    def run(fn):
        with torch.no_grad(), flop_counter_mode() as fc:
            fn()
        return int(fc.get_total_flops())

    lq = torch.zeros(1, 3, hp, wp, **meta)
    upscale = model.upscale if model.dcm is None else lambda x: dcm_inference(model.dcm, x)  # as the pipelines run
    upscale(lq)  # the DCM folds its upsampler on the first call (A45): not counted per frame
    out["dcm"] = run(lambda: upscale(lq))
    i_c = torch.zeros(1, 3, hp * s, wp * s, **meta)
    out["vae_encode"] = run(lambda: model.encode(i_c))
    z = torch.zeros(1, 4, hp * s // lat, wp * s // lat, **meta)
    t = torch.zeros(1, dtype=torch.long, **meta)
    out["denoise_step"] = run(lambda: model.predict(z, t, z))
    _, feats = model.encode(i_c)
    out["vae_decode"] = run(lambda: model.decode(z, feats, num_frames=1))
    out["per_frame_50_steps"] = out["dcm"] + out["vae_encode"] + 50 * out["denoise_step"] + out["vae_decode"]
    return out


def count_flops_ultravsr(cfg, out_h: int = 720, out_w: int = 1280) -> dict:
    """UltraVSR's FLOPs for one (out_h, out_w) output frame: bicubic x4 (not counted), VAE encode, one UNet
    call, VAE decode, at the padded size (windows of one frame: RTS's neighbour terms are then zero-cost)."""
    from sdatc.models.ultravsr import UltraVSR

    with torch.device("meta"):
        model = UltraVSR.from_config(cfg)
    h, w = out_h // 4, out_w // 4
    m = model.pad_multiple
    hp, wp = h + (-h % m), w + (-w % m)
    lat = 2 ** (len(model.vae.config.block_out_channels) - 1)
    out = {"frame": [out_h, out_w], "lr": [h, w], "lr_padded": [hp, wp]}

    def run(fn):
        with torch.no_grad(), flop_counter_mode() as fc:
            fn()
        return int(fc.get_total_flops())

    img = torch.zeros(1, 3, hp * 4, wp * 4, device="meta")
    z = torch.zeros(1, 4, hp * 4 // lat, wp * 4 // lat, device="meta")
    out["vae_encode"] = run(lambda: model.encode(img))
    out["denoise_step"] = run(lambda: model.predict(z, 500, num_frames=1))
    out["vae_decode"] = run(lambda: model.decode(z, num_frames=1))
    out["per_frame_one_step"] = out["vae_encode"] + out["denoise_step"] + out["vae_decode"]
    return out


_DENOISE_FLOPS: dict[tuple, int] = {}  # (config kind, repr(config), h, w) -> FLOPs, over the process


def denoise_step_flops(cfg, shapes) -> dict[tuple[int, int], int]:
    """FLOPs of one frame's denoising step (``model.predict`` on a batch of one: SDATC's guidance
    encoder and UNet, or UltraVSR's UNet with one-frame windows) at each latent (h, w) in ``shapes``,
    counted on the meta device and cached per (model config, shape) for the process.

    ``count_flops(cfg, H, W)["denoise_step"]`` is this at the padded full-frame latent; a tiled
    pipeline runs the denoiser at its tile shapes instead (``pipe.unet_evals`` counts them)."""
    from sdatc.models.ultravsr import UltraVSR, UltraVSRConfig

    uv = isinstance(cfg, UltraVSRConfig)
    key = ("ultravsr" if uv else "sdatc", repr(cfg))
    todo = sorted({(int(h), int(w)) for h, w in shapes} - {k[2:] for k in _DENOISE_FLOPS if k[:2] == key})
    if todo:
        from sdatc.models.sdatc import SDATC

        with torch.device("meta"):
            model = UltraVSR.from_config(cfg) if uv else SDATC.from_config(cfg)
        for h, w in todo:
            z = torch.zeros(1, 4, h, w, device="meta")
            with torch.no_grad(), flop_counter_mode() as fc:
                if uv:
                    model.predict(z, 500, num_frames=1)
                else:
                    model.predict(z, torch.zeros(1, dtype=torch.long, device="meta"), z)
            _DENOISE_FLOPS[(*key, h, w)] = int(fc.get_total_flops())
    return {(int(h), int(w)): _DENOISE_FLOPS[(*key, int(h), int(w))] for h, w in shapes}


def format_report(report: dict) -> str:
    rows = [f"{'module':<14}{'trainable':>16}{'total':>18}"]
    for name, v in report["modules"].items():
        rows.append(f"{name:<14}{v['trainable'] / 1e6:>14.2f} M{v['total'] / 1e6:>16.2f} M")
    rows.append("-" * len(rows[0]))
    rows.append(f"{'sum':<14}{report['trainable'] / 1e6:>14.2f} M{report['total'] / 1e6:>16.2f} M")
    if "flops" in report:
        f = report["flops"]
        rows.append(f"\nFLOPs per {f['frame'][1]}x{f['frame'][0]} output frame (LR {f['lr'][1]}x{f['lr'][0]}, "
                    f"padded {f['lr_padded'][1]}x{f['lr_padded'][0]}):")
        for k in ("dcm", "vae_encode", "denoise_step", "vae_decode", "per_frame_50_steps", "per_frame_one_step"):
            if k in f:
                rows.append(f"  {k:<20}{f[k] / 1e12:>10.2f} TFLOP")
    return "\n".join(rows)
