"""LoHa (LyCORIS): the Hadamard product of two low-rank products, optionally with Tucker cores.

delta = (w1a @ w1b) * (w2a @ w2b). With Tucker cores t1/t2 each product is rebuilt as
einsum("i j ..., j r, i p -> p r ...", t, w_b, w_a), where w_a is (rank x out) and w_b (rank x in).
"""

from __future__ import annotations

from typing import ClassVar

from ..lazy_torch import torch
from .base import Kind, Shapes, Tensors

ROLES = ("w1a", "w1b", "w2a", "w2b")


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    return torch.einsum("i j ..., j r, i p -> p r ...", t.float(), wb.float(), wa.float())


class LoHa(Kind):
    name = "loha"
    label = "LoHa"
    names: ClassVar[dict[str, dict[str, str]]] = {
        scheme: {
            "hada_w1_a": "w1a",
            "hada_w1_b": "w1b",
            "hada_w2_a": "w2a",
            "hada_w2_b": "w2b",
            "hada_t1": "t1",
            "hada_t2": "t2",
        }
        for scheme in ("kohya", "peft")
    }

    def missing(self, roles: set[str]) -> list[str]:
        need = [r for r in ROLES if r not in roles]
        if ("t1" in roles) != ("t2" in roles):
            need.append("t2" if "t1" in roles else "t1")
        return need

    def check(self, shapes: Shapes) -> str | None:
        w1a, w1b, w2a, w2b = (shapes[r] for r in ROLES)
        if any(len(s) != 2 for s in (w1a, w1b, w2a, w2b)):
            return "hada_w1_a/b and hada_w2_a/b must all be 2-D"
        if "t1" in shapes:
            t1, t2 = shapes["t1"], shapes["t2"]
            if w1a[0] != w1b[0] or w2a[0] != w2b[0] or t1[:2] != (w1a[0], w1b[0]) or t2[:2] != (w2a[0], w2b[0]):
                return "Tucker LoHa needs t (r x r x k..), w_a (r x out), w_b (r x in) with one rank per product"
            if (w1a[1], w1b[1], t1[2:]) != (w2a[1], w2b[1], t2[2:]):
                return "the two Hadamard factors rebuild to different shapes"
            return None
        if w1a[1] != w1b[0] or w2a[1] != w2b[0]:
            return f"w1 {list(w1a)}@{list(w1b)} or w2 {list(w2a)}@{list(w2b)} do not multiply"
        if (w1a[0], w1b[1]) != (w2a[0], w2b[1]):
            return f"w1 ({w1a[0]}x{w1b[1]}) and w2 ({w2a[0]}x{w2b[1]}) rebuild to different shapes"
        return None

    def rank(self, shapes: Shapes) -> int:
        return shapes["w1b"][0]

    def weight_shape(self, shapes: Shapes) -> tuple[int, ...]:
        if "t1" in shapes:
            return (shapes["w1a"][1], shapes["w1b"][1], *shapes["t1"][2:])
        return (shapes["w1a"][0], shapes["w1b"][1])

    def delta(self, tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
        if "t1" in tensors:
            return _tucker(tensors["t1"], tensors["w1a"], tensors["w1b"]) * _tucker(
                tensors["t2"], tensors["w2a"], tensors["w2b"]
            )
        w1 = tensors["w1a"].float() @ tensors["w1b"].float()
        return w1 * (tensors["w2a"].float() @ tensors["w2b"].float())
