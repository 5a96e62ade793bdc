"""IA3 (LyCORIS `ia3`): one learned vector that rescales the weight along one axis.

W' = W * (1 + m * w), per output row, or per input column when the file's `on_input` flag is set.
The update depends on W, so IA3 has no update of its own, no rank and no alpha (scale 1); its
vector fixes only the axis it scales. A conv's vector is stored (1, C, 1, 1) for either axis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from ..lazy_torch import torch
from .base import ANY, Kind, Shapes, Tensors

AXES = ("out", "in")  # roles of the vector once `on_input` is read


class IA3(Kind):
    name = "ia3"
    label = "IA3"
    names: ClassVar[dict[str, dict[str, str]]] = {"kohya": {"weight": "vector", "on_input": "on_input"}}
    reads_base = True
    stores_alpha = False
    companions: ClassVar[dict[str, str]] = {"weight": "on_input"}  # a bare `.weight` is any checkpoint's
    flag_roles: ClassVar[tuple[str, ...]] = ("on_input",)
    aliases: ClassVar[dict[str, str]] = {axis: "vector" for axis in AXES}

    def refine(
        self, keys: dict[str, str], numel: Callable[[str], int], scalar: Callable[[str], float]
    ) -> dict[str, str]:
        if "vector" not in keys or "on_input" not in keys:
            return keys
        if numel(keys["on_input"]) != 1:
            return keys  # `check` names the problem
        refined = {role: key for role, key in keys.items() if role != "vector"}
        refined["in" if scalar(keys["on_input"]) != 0 else "out"] = keys["vector"]
        return refined

    def missing(self, roles: set[str]) -> list[str]:
        need = [] if roles & {"vector", *AXES} else ["weight"]
        return need + ([] if "on_input" in roles else ["on_input"])

    def check(self, shapes: Shapes) -> str | None:
        if "vector" in shapes:
            return f"on_input must hold one value, got shape {list(shapes['on_input'])}"
        vector = next(shapes[a] for a in AXES if a in shapes)
        if len(vector) != 1 and (len(vector) < 3 or vector[0] != 1 or any(k != 1 for k in vector[2:])):
            return f"the IA3 vector {list(vector)} must be (C,) for a linear layer or (1, C, 1, ..) for a conv"
        return None

    def rank(self, shapes: Shapes) -> None:
        return None

    def _length(self, shapes: Shapes) -> tuple[str, int, int]:
        axis = "in" if "in" in shapes else "out"
        vector = shapes[axis]
        return axis, vector[0] if len(vector) == 1 else vector[1], len(vector)

    def weight_shape(self, shapes: Shapes) -> tuple[int, ...]:
        axis, length, ndim = self._length(shapes)
        kernel = [ANY] * (ndim - 2)  # a conv's vector is (1, C, 1, ..): one kernel axis per trailing 1
        return (ANY, length, *kernel) if axis == "in" else (length, ANY, *kernel)

    def output_rows(self, tensors: Tensors) -> set[str]:
        return {"out"} if "out" in tensors else set()

    def delta(self, tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
        if weight is None:
            raise ValueError("IA3's update is a rescaling of the base weight; it needs the weight")
        if "out" in tensors:
            return weight * tensors["out"].float().reshape(-1, 1)
        vector = tensors["in"].float().reshape(-1)
        return (weight.view(weight.shape[0], vector.numel(), -1) * vector.view(1, -1, 1)).view(weight.shape)
