"""PEFT's VeRA: two frozen random projections shared by every module, scaled per module by two
trained vectors.

delta = (lambda_b * B[:out]) @ (lambda_d * A[:, :in]), with `vera_A` (r, largest in) and `vera_B`
(largest out, r) saved once per adapter (`base_model.vera_A`, `base_model.vera_B`) and sliced to
each layer's width. No alpha (scale 1). A module's input width is not in any of its tensors, so the
update is formed against the base weight it meets, like IA3's; the PEFT reader attaches the shared
projections to every module.
"""

from __future__ import annotations

from typing import ClassVar

from ..lazy_torch import torch
from .base import ANY, Kind, Shapes, Tensors

SHARED = {"vera_A": "A", "vera_B": "B"}  # the projections' names beside the module paths, and their roles


class VeRA(Kind):
    name = "vera"
    label = "VeRA"
    names: ClassVar[dict[str, dict[str, str]]] = {"peft": {"vera_lambda_b": "lambda_b", "vera_lambda_d": "lambda_d"}}
    reads_base = True
    stores_alpha = False
    has_alpha = False

    def missing(self, roles: set[str]) -> list[str]:
        return [f"vera_{r}" for r in ("lambda_b", "lambda_d") if r not in roles]

    def check(self, shapes: Shapes) -> str | None:
        lambda_b, lambda_d = shapes["lambda_b"], shapes["lambda_d"]
        if len(lambda_b) != 1 or len(lambda_d) != 1:
            return f"vera_lambda_b {list(lambda_b)} and vera_lambda_d {list(lambda_d)} must be vectors"
        a, b = shapes.get("A"), shapes.get("B")
        if a is None or b is None:
            return "the shared projections vera_A and vera_B are not attached to this module"
        if len(a) != 2 or len(b) != 2 or a[0] != lambda_d[0] or b[1] != lambda_d[0]:
            return f"vera_A {list(a)} and vera_B {list(b)} must be (r, in) and (out, r) with r = {lambda_d[0]}"
        if b[0] < lambda_b[0]:
            return f"vera_B {list(b)} has fewer rows than vera_lambda_b's {lambda_b[0]}"
        return None

    def rank(self, shapes: Shapes) -> int:
        return shapes["lambda_d"][0]

    def weight_shape(self, shapes: Shapes) -> tuple[int, ...]:
        return (shapes["lambda_b"][0], ANY)

    def parameters(self, shapes: Shapes) -> int:
        return shapes["lambda_b"][0] + shapes["lambda_d"][0]  # the projections are shared, and frozen

    def output_rows(self, tensors: Tensors) -> set[str]:
        return {"lambda_b", "B"}

    def delta(self, tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
        if weight is None:
            raise ValueError("VeRA's projections are cut to the base weight's width; its update needs the weight")
        rows, columns = weight.shape[0], weight[0].numel()
        up = tensors["lambda_b"].float().reshape(-1, 1) * tensors["B"].float()[:rows]
        down = tensors["lambda_d"].float().reshape(-1, 1) * tensors["A"].float()[:, :columns]
        return (up @ down).reshape(weight.shape)
