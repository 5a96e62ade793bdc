"""PEFT's AdaLoRA: a LoRA written as an SVD, B @ diag(E) @ A, whose rank allocation prunes entries of E.

Tensors `lora_A` (r, in), `lora_E` (r, 1), `lora_B` (out, r) (no `.weight`: they are parameters, not
layers). PEFT scales by lora_alpha / (ranknum + 1e-5), where ranknum is the rank the layer was
created with (`init_r`), not the rank left after pruning: a pruned entry of E is a zero, or a row
PEFT cut from the saved tensors by the config's `rank_pattern`. The product is an ordinary low-rank
update, so every command that takes a LoRA takes this one as the LoRA (B, E * A) it equals.
"""

from __future__ import annotations

import math
from typing import ClassVar

from ..lazy_torch import torch
from .base import Kind, Shapes, Tensors

EPSILON = 1e-5  # PEFT adds it to ranknum before dividing


class AdaLoRA(Kind):
    name = "adalora"
    label = "AdaLoRA"
    names: ClassVar[dict[str, dict[str, str]]] = {
        "peft": {"lora_A": "down", "lora_E": "singular", "lora_B": "up", "ranknum": "ranknum"}
    }
    stores_alpha = False
    low_rank_product = True
    declares_factor_rank = False  # the config's rank is ranknum, the divisor of the scale
    flag_roles: ClassVar[tuple[str, ...]] = ("ranknum",)

    def missing(self, roles: set[str]) -> list[str]:
        return [f"lora_{r}" for r, role in (("A", "down"), ("E", "singular"), ("B", "up")) if role not in roles]

    def check(self, shapes: Shapes) -> str | None:
        down, singular, up = shapes["down"], shapes["singular"], shapes["up"]
        if len(down) != 2 or len(up) != 2:
            return f"lora_A {list(down)} and lora_B {list(up)} must be 2-D (AdaLoRA adapts linear layers)"
        if singular not in ((down[0], 1), (down[0],)):
            return f"lora_E {list(singular)} must hold one value per rank of lora_A {list(down)}"
        if up[1] != down[0]:
            return f"lora_B {list(up)} has {up[1]} columns but lora_A {list(down)} has rank {down[0]}"
        if "ranknum" in shapes and math.prod(shapes["ranknum"]) != 1:
            return f"ranknum must hold one value, got shape {list(shapes['ranknum'])}"
        return None

    def rank(self, shapes: Shapes) -> int:
        return shapes["down"][0]

    def scale(
        self, alpha: float | None, shapes: Shapes, rslora: bool = False, declared_rank: int | None = None
    ) -> float:
        """lora_alpha / (ranknum + 1e-5), ranknum being the rank at creation (`declared_rank`)."""
        rank = self.rank(shapes)
        ranknum = declared_rank if declared_rank is not None else rank
        return (alpha if alpha is not None else float(rank)) / (ranknum + EPSILON)

    def weight_shape(self, shapes: Shapes) -> tuple[int, ...]:
        return (shapes["up"][0], shapes["down"][1])

    def low_rank(self, tensors: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
        singular = tensors["singular"].float().reshape(-1, 1)
        return tensors["up"].float(), tensors["down"].float() * singular

    def delta(self, tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
        up, down = self.low_rank(tensors)
        return up @ down
