"""Precision and modes of the parts of a training run that do not train.

    mp = resolve_precision("bf16", cuda=False)     # "bf16": honoured on the CPU too; fp16 there: an error
    cast_frozen_backbone(model, torch.bfloat16)   # SD's own weights only; new modules stay fp32
    raft = FrozenHelper(raft)                       # always eval, fp32, autocast off
    keep_frozen_in_eval(stage)                      # after stage.train(): frozen subtrees back to eval

Rules: SD's frozen UNet and VAE take the run's low dtype (the memory win); every new module, trainable
or frozen (a stage-1 DCM during stage 2), stays fp32 so checkpoints hold its exact values; fp16 keeps
the VAE decoder in fp32. Helper networks (RAFT, LPIPS) never enter train mode and run in fp32 with
autocast off (RAFT's correlation volume and LPIPS' normalised features lose too much in bf16).
"""

from __future__ import annotations

import torch
from torch import nn

from sdatc.errors import SdatcError
from sdatc.models.sites import cast_pretrained

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(requested: str, cuda: bool, vsd: bool = False) -> str:
    """The precision a run uses: what was asked, or a clear error (never a silent fallback). ``vsd``: the run
    trains UltraVSR's VSD fake score with a second optimiser, which fp16's loss scaling cannot serve
    (accelerate's clip_grad_norm_ unscales every optimiser, the second one's step unscales again)."""
    if requested not in DTYPES:
        raise SdatcError(f"mixed_precision must be one of {', '.join(DTYPES)}, got {requested!r}")
    if requested == "fp16" and vsd:
        raise SdatcError("mixed_precision=fp16 with VSD (ultravsr.teacher=vsd) is not supported: the loss scaler "
                         "would unscale the fake score's gradients twice; use mixed_precision=bf16")
    if requested == "fp16" and not cuda:
        raise SdatcError("mixed_precision=fp16 needs a GPU (torch has no fp16 autocast worth training with on the "
                         "CPU); use mixed_precision=bf16 (works on the CPU) or mixed_precision=no")
    return requested


def describe_precision(mp: str) -> str:
    """One line for the log and the top of config.yaml."""
    if mp == "no":
        return "precision: fp32 (no autocast)"
    vae = "VAE decoder fp32, " if mp == "fp16" else ""
    return f"precision: {mp} autocast, frozen SD weights {mp} ({vae}new modules fp32), helpers (RAFT, LPIPS) fp32"


def cast_frozen_backbone(model: nn.Module, dtype: torch.dtype, parts: tuple[str, ...] = ("unet", "vae")) -> list[str]:
    """Cast SD's own frozen weights (``model.unet``, ``model.vae``) to ``dtype``; returns the parts cast.

    New modules (Site modules inside the UNet and VAE decoder, peft LoRA tensors) and any trained SD
    layer (UltraVSR's conv_in) are never cast. With fp16 the VAE decoder (and its post-quant conv) stays fp32."""
    if dtype == torch.float32:
        return []
    named = {"unet": model.unet}
    if "vae" in parts:
        named |= {"vae.encoder": model.vae.encoder, "vae.quant_conv": model.vae.quant_conv}
        if dtype != torch.float16:
            named |= {"vae.decoder": model.vae.decoder, "vae.post_quant_conv": model.vae.post_quant_conv}
    done = []
    for name, part in named.items():
        if part is None or name.split(".")[0] not in parts:
            continue
        cast_pretrained(part, dtype)
        done.append(name)
    return done


class FrozenHelper(nn.Module):
    """A frozen helper network (RAFT, LPIPS' trunk): eval mode whatever ``train()`` says, fp32 weights,
    called with autocast off and floating inputs cast to fp32. Gradients still flow to its inputs."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.float().eval().requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, *args, **kwargs):
        device = next(self.net.parameters()).device.type
        args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        with torch.autocast(device, enabled=False):
            return self.net(*args, **kwargs)


def keep_frozen_in_eval(root: nn.Module) -> None:
    """Put every subtree whose parameters are all frozen into eval mode (dropout, drop-path and
    BatchNorm of frozen parts must not act as in training); trainable modules keep their mode. A module
    without parameters (a dropout, an activation) follows its nearest ancestor that has some: eval
    when any of that ancestor's parameters is frozen (e.g. inside SD's UNet, which holds Site modules)."""
    parent: dict[int, nn.Module] = {}
    for m in root.modules():
        for child in m.children():
            parent[id(child)] = m
    for m in root.modules():
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()
        elif not params:
            owner = parent.get(id(m))
            while owner is not None and not any(True for _ in owner.parameters()):
                owner = parent.get(id(owner))
            if owner is not None and any(not p.requires_grad for p in owner.parameters()):
                m.eval()
