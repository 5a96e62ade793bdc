"""DoRA (weight-decomposed low-rank adaptation) as one modifier on top of a kind.

A DoRA module is a LoRA, LoHa or LoKr module plus a trained magnitude: the merged weight's direction
is kept and its norm, per output row (or, for LyCORIS with `wd_on_out` off, per input column), is
set to the magnitude. Everything that depends on it lives here: the tensor's name in each naming
scheme, how each layout stores its shape, which layouts cannot hold it, how it follows rows when a
fused module is split or fused, and the merge itself with each trainer's strength rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..lazy_torch import torch
from .base import Kind

ROLE = "dora"  # the magnitude's role beside the kind's own roles
NAMES = {"kohya": "dora_scale", "peft": "lora_magnitude_vector", "mlx": "m"}  # its tensor name per naming scheme


def is_lycoris(key: str) -> bool:
    """LyCORIS's `dora_scale` (its strength rule and eps) rather than PEFT's `lora_magnitude_vector`
    or mlx-lm's `m`, which both set the merged row norm to the magnitude with no eps."""
    return key.endswith(NAMES["kohya"])


def per_column(key: str | None, shape: tuple[int, ...]) -> bool:
    """A LyCORIS magnitude per input column (wd_on_out off: stored (1, in, 1..)) rather than per
    output row; PEFT's magnitude is per output row whatever its stored shape."""
    return key is not None and is_lycoris(key) and len(shape) >= 2 and shape[0] == 1 and math.prod(shape) > 1


def stored_shape(scheme: str, rows: int, factor_ndim: int) -> tuple[int, ...]:
    """The shape a per-row magnitude is written in: LyCORIS keeps (out, 1[, 1, 1]); PEFT keeps (out,)
    for a linear layer and (1, out, 1, 1) for a conv."""
    if scheme == "kohya":
        return (rows, *(1,) * (factor_ndim - 1))
    return (1, rows, *(1,) * (factor_ndim - 2)) if factor_ndim >= 3 else (rows,)


def why_not(scheme: str, kind: Kind, columns: bool, embedding: bool) -> str | None:
    """Why a layout of this naming scheme cannot hold a DoRA magnitude of this module (None when it can)."""
    if scheme == "kohya":
        return "DoRA on an embedding has no kohya/LyCORIS form" if embedding else None
    if kind.name != "lora":
        return f"PEFT's {kind.label} has no DoRA; use --to kohya"
    if columns:
        return "its DoRA magnitude is per input column; PEFT's is per output row"
    return None


def fuse_problem(present: list[bool]) -> str | None:
    """A fused weight's row blocks either all carry a magnitude or none does: a norm per row needs
    every row's magnitude."""
    if any(present) and not all(present):
        return "DoRA needs a magnitude for every row block, and some parts have none"
    return None


@dataclass(frozen=True)
class Magnitude:
    """A module's magnitude on the device, ready for `apply`."""

    values: torch.Tensor  # flat, fp32
    columns: bool  # per input column, else per output row
    lycoris: bool  # LyCORIS's strength rule and eps, else PEFT's

    @classmethod
    def of(cls, key: str, shape: tuple[int, ...], values: torch.Tensor) -> Magnitude:
        return cls(values, per_column(key, shape), is_lycoris(key))


def apply(
    target: torch.Tensor,
    merged: torch.Tensor,
    magnitude: torch.Tensor,
    strength: float,
    *,
    columns: bool,
    lycoris: bool,
) -> None:
    """DoRA on `target` (W, fp32, 2-D), given V = W + scale * delta as `merged`: the direction of V
    at the trained magnitude, with the norm per output row (per input column when `columns`).

    The strength rule follows the file's trainer. LyCORIS (`dora_scale`): g = m / (||V|| + eps),
    W' = V * (strength * (g - 1) + 1), so strength 0 keeps V. PEFT (`lora_magnitude_vector`, which
    has no strength of its own): W' = W + strength * (m V / ||V|| - W), ComfyUI's rule, so 0 keeps W.
    DoRA rescales by the merged norm, so neither has an exact "subtract" from files alone.
    """
    if columns:
        inputs = magnitude.numel()
        norm = torch.linalg.vector_norm(merged.view(merged.shape[0], inputs, -1), dim=(0, 2))
    else:
        norm = torch.linalg.vector_norm(merged, dim=1)
    if lycoris:
        norm.add_(torch.finfo(torch.float32).eps)
    gain = magnitude.reshape(-1) / norm
    if lycoris:
        gain.sub_(1).mul_(strength).add_(1)
    if columns:
        merged.view(merged.shape[0], inputs, -1).mul_(gain.view(1, -1, 1))
    else:
        merged.mul_(gain.unsqueeze(1))
    if lycoris or strength == 1.0:
        target.copy_(merged)
    else:
        target.lerp_(merged, strength)
