"""LoKr (LyCORIS): delta = kron(w1, w2), each factor full or a low-rank product, w2 optionally Tucker.

The rank alpha divides by is w1_b's (when w1 is factored) else w2_b's. When both factors are full
matrices the tensors show no rank: LyCORIS then uses scale 1 whatever alpha says (it forces
alpha = dim), while PEFT still scales by alpha / r with r from its config (`declared_rank`).
"""

from __future__ import annotations

from typing import ClassVar

from ..lazy_torch import torch
from .base import Kind, Shapes, Tensors
from .loha import _tucker


class LoKr(Kind):
    name = "lokr"
    label = "LoKr"
    names: ClassVar[dict[str, dict[str, str]]] = {
        scheme: {
            "lokr_w1": "w1",
            "lokr_w1_a": "w1a",
            "lokr_w1_b": "w1b",
            "lokr_w2": "w2",
            "lokr_w2_a": "w2a",
            "lokr_w2_b": "w2b",
            "lokr_t2": "t2",
        }
        for scheme in ("kohya", "peft")
    }

    def missing(self, roles: set[str]) -> list[str]:
        need = []
        if "w1" not in roles:
            need += [r for r in ("w1a", "w1b") if r not in roles]
        if "w2" not in roles:
            need += [r for r in ("w2a", "w2b") if r not in roles]
        return need

    def _factor_shape(self, shapes: Shapes, n: int) -> tuple[int, ...] | str:
        if f"w{n}" in shapes:
            return shapes[f"w{n}"]
        a, b = shapes[f"w{n}a"], shapes[f"w{n}b"]
        if n == 2 and "t2" in shapes:
            t = shapes["t2"]
            if a[0] != b[0] or t[:2] != (a[0], b[0]):
                got = f"{list(t)}, {list(a)}, {list(b)}"
                return f"Tucker w2 needs t2 (r x r x k..), w2_a (r x out), w2_b (r x in); got {got}"
            return (a[1], b[1], *t[2:])
        if len(a) != 2 or a[1] != b[0]:
            return f"w{n}_a {list(a)} and w{n}_b {list(b)} do not multiply"
        return (a[0], *b[1:])

    def check(self, shapes: Shapes) -> str | None:
        for n in (1, 2):
            s = self._factor_shape(shapes, n)
            if isinstance(s, str):
                return s
        return None

    def rank(self, shapes: Shapes) -> int | None:
        if "w1" not in shapes:
            return shapes["w1b"][0]
        if "w2" not in shapes:
            return shapes["w2b"][0]
        return None

    def weight_shape(self, shapes: Shapes) -> tuple[int, ...]:
        w1, w2 = self._factor_shape(shapes, 1), self._factor_shape(shapes, 2)
        return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])

    def _factor(self, tensors: Tensors, n: int) -> torch.Tensor:
        if f"w{n}" in tensors:
            return tensors[f"w{n}"].float()
        a, b = tensors[f"w{n}a"].float(), tensors[f"w{n}b"].float()
        if n == 2 and "t2" in tensors:
            return _tucker(tensors["t2"], a, b)
        return (a @ b.flatten(1)).reshape(a.shape[0], *b.shape[1:])

    forms_update: ClassVar[bool] = False

    def norm_and_peak(self, tensors: Tensors, scale: float) -> tuple[float, float]:
        """From the two factors alone: ||kron(w1, w2)|| = ||w1|| ||w2||, and every entry of the
        product is one entry of w1 times one of w2, so a file whose Kronecker product is far larger
        than any layer costs no more than its factors."""
        w1, w2 = self._factor(tensors, 1), self._factor(tensors, 2)
        norm = abs(scale) * float(w1.double().norm()) * float(w2.double().norm())
        peak = abs(scale) * float(w1.abs().max()) * float(w2.abs().max()) if w1.numel() and w2.numel() else 0.0
        return norm, peak

    def delta(self, tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
        w1, w2 = self._factor(tensors, 1), self._factor(tensors, 2)
        if w2.dim() > 2:  # conv: kron over (out, in), broadcast over the kernel
            w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - 2)))
        return torch.kron(w1.contiguous(), w2.contiguous())  # kron views its inputs: an einsum result may not allow it
