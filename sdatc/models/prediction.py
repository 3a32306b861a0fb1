"""What the UNet predicts: epsilon or v (SD 2.1-base: epsilon; SD 2.1 768: v_prediction).

    x0, eps = split_prediction(unet_out, z_t, alphas_cumprod[t], "v_prediction")
    loss = mse(unet_out, training_target(z0, noise, alphas_cumprod[t], "v_prediction"))

With ``a = alphas_cumprod[t]`` and ``z_t = sqrt(a) z0 + sqrt(1 - a) eps``:
epsilon: ``x0 = (z_t - sqrt(1 - a) eps) / sqrt(a)``; v (Salimans & Ho 2022):
``v = sqrt(a) eps - sqrt(1 - a) z0``, so ``x0 = sqrt(a) z_t - sqrt(1 - a) v`` and
``eps = sqrt(1 - a) z_t + sqrt(a) v``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sdatc.errors import SdatcError

PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_prediction_type(prediction_type: str, where: str = "the scheduler config") -> str:
    """The type itself, or a one-line error naming where it came from."""
    if prediction_type not in PREDICTION_TYPES:
        raise SdatcError(f"prediction_type {prediction_type!r} from {where} is not supported "
                         f"(sdatc runs {' and '.join(PREDICTION_TYPES)})")
    return prediction_type


def _alpha(a: Tensor | float, like: Tensor) -> Tensor:
    """alpha-bar as a tensor broadcastable over ``like`` (N, C, H, W): a scalar or one value per row."""
    a = torch.as_tensor(a, device=like.device, dtype=torch.float64 if not torch.is_tensor(a) else None)
    a = a.to(device=like.device, dtype=torch.float32)
    return a.view(-1, *([1] * (like.ndim - 1))) if a.ndim else a


def split_prediction(output: Tensor, z_t: Tensor, a: Tensor | float, prediction_type: str) -> tuple[Tensor, Tensor]:
    """(x0, eps) from the UNet output at noise level alpha-bar ``a``; computed in float32."""
    out, z, a = output.float(), z_t.float(), _alpha(a, z_t)
    if prediction_type == "epsilon":
        return (z - (1 - a).sqrt() * out) / a.sqrt(), out
    if prediction_type == "v_prediction":
        return a.sqrt() * z - (1 - a).sqrt() * out, (1 - a).sqrt() * z + a.sqrt() * out
    raise SdatcError(f"unknown prediction_type {prediction_type!r} (sdatc runs {' and '.join(PREDICTION_TYPES)})")


def training_target(z0: Tensor, noise: Tensor, a: Tensor | float, prediction_type: str) -> Tensor:
    """What the UNet should output for ``z_t = sqrt(a) z0 + sqrt(1 - a) noise``; float32."""
    if prediction_type == "epsilon":
        return noise.float()
    if prediction_type == "v_prediction":
        a = _alpha(a, z0)
        return a.sqrt() * noise.float() - (1 - a).sqrt() * z0.float()
    raise SdatcError(f"unknown prediction_type {prediction_type!r} (sdatc runs {' and '.join(PREDICTION_TYPES)})")
