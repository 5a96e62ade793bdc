"""GLoRA (LyCORIS `glora`): a low-rank update plus a low-rank map applied to the weight itself.

delta = W @ a1 @ a2 + b1 @ b2, scaled by alpha / rank with rank = a2's rows. LyCORIS stores a1 as
(in, r) and a2 as (r, in); for convs both are 1x1 and W @ a1 @ a2 acts on the input channels at
each kernel position. `bm` (a Tucker core between a 1x1 b2 and b1) is read when present.
"""

from __future__ import annotations

from typing import ClassVar

from ..lazy_torch import torch
from .base import Kind, Shapes, Tensors


class GLoRA(Kind):
    name = "glora"
    label = "GLoRA"
    names: ClassVar[dict[str, dict[str, str]]] = {
        "kohya": {"a1.weight": "a1", "a2.weight": "a2", "b1.weight": "b1", "b2.weight": "b2", "bm.weight": "bm"}
    }
    reads_base = True

    def missing(self, roles: set[str]) -> list[str]:
        return [f"{r}.weight" for r in ("a1", "a2", "b1", "b2") if r not in roles]

    def check(self, shapes: Shapes) -> str | None:
        a1, a2, b1, b2, bm = (shapes.get(r) for r in ("a1", "a2", "b1", "b2", "bm"))
        if any(not 2 <= len(s) <= 5 for s in (a1, a2, b1, b2)):
            return "a1, a2, b1 and b2 must be 2-D (linear) or 3-D to 5-D (conv)"
        if any(len(s) >= 3 and any(k != 1 for k in s[2:]) for s in (a1, a2, b1)):
            return "a1, a2 and b1 must be 1x1 convs"
        if (a1[1], a2[0], a2[1]) != (a2[0], a1[1], a1[0]):
            return f"a1 {list(a1)} and a2 {list(a2)} must be (in x r) and (r x in)"
        if b1[1] != b2[0]:
            return f"b1 {list(b1)} has {b1[1]} columns but b2 {list(b2)} has rank {b2[0]}"
        if b2[1] != a1[0]:
            return f"b2 {list(b2)} reads {b2[1]} inputs but a1 {list(a1)} maps {a1[0]}"
        if bm is not None and (len(bm) != 4 or bm[:2] != (b2[0], b2[0]) or b2[2:] != (1, 1)):
            return f"bm {list(bm)} must be rank x rank x kh x kw between a 1x1 b2 and b1"
        return None

    def rank(self, shapes: Shapes) -> int:
        return shapes["a2"][0]

    def weight_shape(self, shapes: Shapes) -> tuple[int, ...]:
        kernel = shapes["bm"][2:] if "bm" in shapes else shapes["b2"][2:]
        return (shapes["b1"][0], shapes["a1"][0], *kernel)

    def output_rows(self, tensors: Tensors) -> set[str]:
        return {"b1"}

    def delta(self, tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
        if weight is None:
            raise ValueError("GLoRA's update multiplies the base weight; it needs the weight")
        a1, a2 = tensors["a1"].float().flatten(1), tensors["a2"].float().flatten(1)
        b1, b2 = tensors["b1"].float().flatten(1), tensors["b2"].float().flatten(1)
        if "bm" in tensors:
            b2 = torch.einsum("ijkl,jr->irkl", tensors["bm"].float(), b2).flatten(1)
        rows, inputs = weight.shape[0], a1.shape[0]
        by_tap = weight.reshape(rows, inputs, -1)  # (rows, in, kernel taps): a1 @ a2 acts on `in`
        mapped = torch.einsum("oik,ir,rj->ojk", by_tap, a1, a2).reshape(weight.shape)
        return mapped + (b1 @ b2).reshape(weight.shape)
