"""What every adapter kind knows about itself.

Formats and operations never special-case a kind: they ask it for its tensor names, its rank and
scale rule, whether a set of shapes is consistent, and its weight update. Adding a kind is adding
one subclass in this package and registering it in `kinds/__init__.py`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch

Shapes = Mapping[str, tuple[int, ...]]
Tensors = Mapping[str, torch.Tensor]


class Kind(ABC):
    name: str  # short id used in reports and JSON: lora, loha, lokr
    label: str  # what users call it
    # Tensor names per naming scheme: "kohya" (kohya/LyCORIS files) and "peft" (PEFT and diffusers files),
    # each a map from the suffix after the module name to the role it plays.
    names: Mapping[str, Mapping[str, str]]

    @abstractmethod
    def missing(self, roles: set[str]) -> list[str]:
        """Roles a module with these tensors still needs to be complete (empty when complete)."""

    @abstractmethod
    def check(self, shapes: Shapes) -> str | None:
        """Why these factor shapes cannot belong together, or None when they can."""

    @abstractmethod
    def rank(self, shapes: Shapes) -> int | None:
        """The rank alpha is divided by (None when the kind has no rank, e.g. LoKr with two full factors)."""

    @abstractmethod
    def weight_shape(self, shapes: Shapes) -> tuple[int, ...]:
        """Shape of the update as the factors define it: (out, in[, kh, kw]); kernels the factors
        do not record stay folded into `in`."""

    @abstractmethod
    def delta(self, tensors: Tensors) -> torch.Tensor:
        """The unscaled update in `weight_shape`, in float32."""

    def scale(
        self, alpha: float | None, shapes: Shapes, rslora: bool = False, declared_rank: int | None = None
    ) -> float:
        """alpha / rank (alpha / sqrt(rank) with rsLoRA); a missing alpha means alpha = rank.

        `declared_rank` (from a PEFT config) stands in when the tensors show no rank.
        """
        rank = self.rank(shapes) or declared_rank
        if rank is None:
            return 1.0
        if alpha is None:
            alpha = float(rank)
        return alpha / (math.sqrt(rank) if rslora else rank)

    def low_rank(self, tensors: Tensors) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B, A) with delta.flatten(1) == B @ A, when the kind is a low-rank product; else None."""
        return None

    def parameters(self, shapes: Shapes) -> int:
        return sum(math.prod(s) for role, s in shapes.items() if role in self.roles)

    @property
    def roles(self) -> set[str]:
        return {role for scheme in self.names.values() for role in scheme.values()}

    def __repr__(self) -> str:
        return f"<kind {self.name}>"
