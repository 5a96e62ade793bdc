"""Full diff (LyCORIS `full`): the update stored whole, `diff` for the weight and `diff_b` for the
bias. W' = W + m * diff, with no alpha and no rank: a trained fine-tune's delta kept as it is."""

from __future__ import annotations

from typing import ClassVar

from ..lazy_torch import torch
from .base import ANY, Kind, Shapes, Tensors


class FullDiff(Kind):
    name = "full"
    label = "full diff"
    names: ClassVar[dict[str, dict[str, str]]] = {"kohya": {"diff": "diff", "diff_b": "bias"}}
    stores_alpha = False

    def missing(self, roles: set[str]) -> list[str]:
        # a bias difference alone (AccVideo's Wan time_projection) updates the bias only
        return [] if roles & {"diff", "bias"} else [next(s for s, r in self.names["kohya"].items() if r == "diff")]

    def check(self, shapes: Shapes) -> str | None:
        diff, bias = shapes.get("diff"), shapes.get("bias")
        if diff is None:
            return None if len(bias) == 1 else f"the bias difference {list(bias)} must be one-dimensional"
        if len(diff) < 1:
            return "the difference must have at least one dimension"
        if bias is not None and bias != diff[:1]:
            return f"the bias difference {list(bias)} does not match the {diff[0]} rows of {list(diff)}"
        return None

    def rank(self, shapes: Shapes) -> None:
        return None  # nothing to divide alpha by: the update is applied at scale 1

    def weight_shape(self, shapes: Shapes) -> tuple[int, ...]:
        return tuple(shapes["diff"]) if "diff" in shapes else (shapes["bias"][0], ANY)

    def delta(self, tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
        if "diff" not in tensors:  # a bias difference alone: nothing for the weight
            return (
                torch.zeros(tensors["bias"].shape[0], 1)
                if weight is None
                else torch.zeros_like(weight, dtype=torch.float32)
            )
        return tensors["diff"].float()
