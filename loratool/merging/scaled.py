"""ComfyUI's "scaled fp8" checkpoints, as merge reads and writes them.

Each quantized weight `X.weight` is stored in float8 beside a float32 `X.scale_weight`: the real
weight is their product. Some files add `X.scale_input` (for fp8 matmuls) and a `scaled_fp8` marker
tensor by which ComfyUI recognises the format. merge dequantizes a weight it updates, adds the
update in fp32, and quantizes the result again under a fresh per-tensor scale (its largest magnitude
over the fp8 format's largest value, so nothing saturates), written beside it; with `--dtype` it
writes every scaled weight dequantized instead and leaves out the scales and the marker, which
would otherwise tell ComfyUI to read the weights as fp8.

HF's fp8 checkpoints (`weight_scale`, `weight_scale_inv`, block-wise) are another format: merge
refuses to update their weights rather than add an update to quantized values.
"""

from __future__ import annotations

from ..errors import MergeError
from ..io.source import TensorSource
from ..lazy_torch import torch

SCALE = "scale_weight"
INPUT_SCALE = "scale_input"
MARKER = "scaled_fp8"
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
OTHER_SCALES = ("weight_scale", "weight_scale_inv")


def scaled_weights(source: TensorSource) -> dict[str, str]:
    """Each float8 weight stored with a `scale_weight`, and that scale's key."""
    found = {}
    for key in source:
        if key.endswith(SCALE):
            weight = key.removesuffix(SCALE) + "weight"
            if weight in source and source.info(weight).dtype in FP8_DTYPES:
                found[weight] = key
    return found


def quantization_keys(source: TensorSource, scaled: dict[str, str]) -> set[str]:
    """What describes the fp8 quantization and goes once the weights are written dequantized: the
    scales of the scaled weights, their input scales, and the marker."""
    keys = set(scaled.values())
    keys |= {w.removesuffix("weight") + INPUT_SCALE for w in scaled} & set(source)
    keys |= {k for k in source if k.rsplit(".", 1)[-1] == MARKER}
    return keys


def refuse_other_quantization(key: str, base: TensorSource) -> None:
    """A weight with an HF-style fp8 scale cannot take an update added to its stored values."""
    stem = key.removesuffix("weight")
    for suffix in OTHER_SCALES:
        if stem + suffix in base:
            raise MergeError(
                f"{key}: a block-scaled fp8 weight ({stem + suffix}); merging into these checkpoints is not "
                "supported (merge into the bf16 checkpoint, or a ComfyUI scaled fp8 one)"
            )


def dequantize(stored: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return stored.float() * scale.float()


def quantize(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 `weight` as `dtype` values and the fp32 scale that restores it: the largest magnitude maps
    to the format's largest value (a zero weight keeps scale 1)."""
    largest = float(weight.abs().max()) if weight.numel() else 0.0
    scale = largest / torch.finfo(dtype).max if largest > 0 else 1.0
    limit = torch.finfo(dtype).max
    values = (weight / scale).clamp_(-limit, limit).to(dtype)
    return values, torch.tensor(scale, dtype=torch.float32)
