"""Full diff (LyCORIS `full`): the update stored whole, `diff` for the weight and `diff_b` for the
bias. W' = W + m * diff, with no alpha and no rank: a trained fine-tune's delta kept as it is."""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import Kind, Shapes, Tensors


class FullDiff(Kind):
    name = "full"
    label = "full diff"
    names: ClassVar[dict[str, dict[str, str]]] = {"kohya": {"diff": "diff", "diff_b": "bias"}}
    stores_alpha = False

    def missing(self, roles: set[str]) -> list[str]:
        return [] if "diff" in roles else [next(s for s, r in self.names["kohya"].items() if r == "diff")]

    def check(self, shapes: Shapes) -> str | None:
        diff, bias = shapes["diff"], shapes.get("bias")
        if len(diff) < 1:
            return "the difference must have at least one dimension"
        if bias is not None and bias != diff[:1]:
            return f"the bias difference {list(bias)} does not match the {diff[0]} rows of {list(diff)}"
        return None

    def rank(self, shapes: Shapes) -> None:
        return None  # nothing to divide alpha by: the update is applied at scale 1

    def weight_shape(self, shapes: Shapes) -> tuple[int, ...]:
        return tuple(shapes["diff"])

    def delta(self, tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
        return tensors["diff"].float()
