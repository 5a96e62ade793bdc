"""A tensor that replaces the base's own ("set" patch in ComfyUI): BFL's Flux control LoRAs (Depth,
Canny) ship the q/k RMSNorm scales they trained as `double_blocks.N.img_attn.norm.key_norm.scale`.

The update is S - W, so a merge at strength s gives W + s (S - W): the file's tensor at strength 1,
the base's at 0. It needs the base weight, so it has no update of its own, no rank and no alpha.
"""

from __future__ import annotations

from typing import ClassVar

from ..lazy_torch import torch
from .base import Kind, Shapes, Tensors


class SetWeight(Kind):
    name = "set"
    label = "set weight"
    names: ClassVar[dict[str, dict[str, str]]] = {"bfl": {"scale": "weight"}}
    reads_base = True
    stores_alpha = False

    def missing(self, roles: set[str]) -> list[str]:
        return [] if "weight" in roles else ["scale"]

    def check(self, shapes: Shapes) -> str | None:
        return None if len(shapes["weight"]) >= 1 else "a weight to set must have at least one dimension"

    def rank(self, shapes: Shapes) -> None:
        return None

    def weight_shape(self, shapes: Shapes) -> tuple[int, ...]:
        return tuple(shapes["weight"])

    def output_rows(self, tensors: Tensors) -> set[str]:
        return {"weight"}

    def delta(self, tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
        if weight is None:
            raise ValueError("a set weight's update is the difference from the base weight; it needs the weight")
        return tensors["weight"].float().reshape(weight.shape) - weight
