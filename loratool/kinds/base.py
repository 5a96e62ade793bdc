"""What every adapter kind knows about itself.

Formats and operations never special-case a kind: they ask it for its tensor names, its rank and
scale rule, whether a set of shapes is consistent, and its weight update. Adding a kind is adding
one subclass in this package and registering it in `kinds/__init__.py`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from functools import cached_property
from typing import ClassVar

from ..lazy_torch import torch

Shapes = Mapping[str, tuple[int, ...]]
Tensors = Mapping[str, "torch.Tensor"]


def has_kernel(shape: tuple[int, ...]) -> bool:
    """A conv weight or down factor whose kernel is larger than 1 somewhere (2-D kernels of UNets,
    3-D patch embeddings of video models): LoCon's conv rank applies to it, a 1x1 conv is a matrix."""
    return len(shape) >= 3 and any(k != 1 for k in shape[2:])


ANY = -1  # a dimension of `weight_shape` the tensors do not fix (IA3 records only the axis it scales)


class Kind(ABC):
    name: str  # short id used in reports and JSON: lora, loha, lokr
    label: str  # what users call it
    # Tensor names per naming scheme: "kohya" (kohya/LyCORIS files) and "peft" (PEFT and diffusers files),
    # each a map from the suffix after the module name to the role it plays.
    names: Mapping[str, Mapping[str, str]]
    # The update depends on the weight it is applied to (IA3 scales it, GLoRA multiplies it), so it
    # exists only next to a base: `delta` then needs `weight`, and nothing can be precomputed.
    reads_base: ClassVar[bool] = False
    # Whether kohya/LyCORIS files give the module an `alpha` tensor, even when the kind ignores it
    # (LyCORIS writes one for two whole LoKr factors, and its loader needs it).
    stores_alpha: ClassVar[bool] = True
    # Tensor names too generic to claim on their own (IA3's `weight`): suffix -> the companion
    # suffix a module must also have (LyCORIS detects IA3 by `on_input` the same way).
    companions: ClassVar[dict[str, str]] = {}
    # The scale is alpha / rank: False for kinds that scale by nothing (VeRA's vectors, OFT's
    # rotations; OFT's alpha is a norm constraint, read as one of its tensors).
    has_alpha: ClassVar[bool] = True
    # The update is one low-rank product (LoRA, and AdaLoRA's B @ diag(E) @ A): `low_rank` gives it,
    # so combine stacks it and resize truncates it as the plain LoRA it equals.
    low_rank_product: ClassVar[bool] = False
    # A config's `r` is the factors' rank and must match them (PEFT refuses otherwise); AdaLoRA's
    # config rank is the divisor of its scale instead.
    declares_factor_rank: ClassVar[bool] = True
    # The role alpha's tensor plays when alpha is a setting of the math rather than a scale (LyCORIS
    # OFT's norm constraint): readers put the tensor among the module's pieces under this role.
    alpha_role: ClassVar[str | None] = None
    # Strength acts inside the update, not on it (OFT's rotations are interpolated toward the
    # identity): merge asks `merged` for the new weight instead of adding strength * delta.
    strength_inside: ClassVar[bool] = False
    # A negative strength means something (an exact subtract for additive kinds, the same formula
    # for IA3 and DoRA, as their trainers apply it); rotations have no meaningful negative.
    negative_strength: ClassVar[bool] = True
    # The update mixes the weight's rows (LyCORIS OFT rotates blocks of output rows), so it needs a
    # module's whole weight at once, never one row block of a fused weight.
    whole_weight: ClassVar[bool] = False
    # Roles `refine` gives a tensor, and the role whose name it is written under (IA3's vector is
    # read as "vector" and refined to "out" or "in" by its `on_input` flag).
    aliases: ClassVar[dict[str, str]] = {}
    # Roles that hold a setting rather than weights (IA3's `on_input`): any dtype, never a factor.
    flag_roles: ClassVar[tuple[str, ...]] = ()

    def configured(self, config: dict) -> Kind:
        """The kind under an adapter config's settings of its math (PEFT OFT's COFT and Cayley
        options); kinds whose tensors say everything return themselves."""
        return self

    def variant(self, shapes: Shapes) -> str:
        """The name of the kind these tensors are, for kinds that share tensor names (LyCORIS's OFT
        and BOFT both store `oft_blocks`, told apart by its number of axes)."""
        return self.name

    def refine(
        self, keys: dict[str, str], numel: Callable[[str], int], scalar: Callable[[str], float]
    ) -> dict[str, str]:
        """The roles once the values of tiny flag tensors are known (IA3's `on_input` decides which
        axis its vector scales); read with the header (`numel` of a key, `scalar` its first value)
        so shapes alone say what a module does."""
        return keys

    @abstractmethod
    def missing(self, roles: set[str]) -> list[str]:
        """Roles a module with these tensors still needs to be complete (empty when complete)."""

    @abstractmethod
    def check(self, shapes: Shapes) -> str | None:
        """Why these factor shapes cannot belong together, or None when they can."""

    @abstractmethod
    def rank(self, shapes: Shapes) -> int | None:
        """The rank alpha is divided by (None when the kind has no rank, e.g. LoKr with two full factors)."""

    def block_size(self, shapes: Shapes) -> int | None:
        """The size of each rotation block, for kinds that rotate the weight (OFT, BOFT) instead of
        adding a product of some rank."""
        return None

    @abstractmethod
    def weight_shape(self, shapes: Shapes) -> tuple[int, ...]:
        """Shape of the update as the factors define it: (out, in[, kernel...]); kernels the factors
        do not record stay folded into `in`, and dimensions they do not fix are `ANY`."""

    @abstractmethod
    def delta(self, tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The unscaled update in `weight_shape`, in float32.

        Kinds that read the base take `weight` (fp32, (rows, in * kh * kw), already restricted to
        the rows being updated along with `output_rows`) and return the update in that shape.
        """

    def merged(self, tensors: Tensors, weight: torch.Tensor, strength: float) -> torch.Tensor:
        """The new weight at `strength` for kinds whose strength acts inside the update."""
        return weight + strength * self.delta(tensors, weight)

    def norm_and_peak(self, tensors: Tensors, scale: float) -> tuple[float, float]:
        """(Frobenius norm, largest |entry|) of scale * update. This forms the update, so it costs
        `weight_shape`; a kind that knows both from its factors says so with `forms_update`."""
        dense = scale * self.delta(tensors)
        return float(dense.norm()), float(dense.abs().max()) if dense.numel() else 0.0

    # Whether `norm_and_peak` forms the whole update (its memory is the declared weight's size).
    forms_update: ClassVar[bool] = True

    def output_rows(self, tensors: Tensors) -> set[str]:
        """Roles whose first axis runs over the update's output rows: a kind that reads the base
        gets them cut to the rows of each base tensor it updates."""
        return set()

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
        roles = self.roles
        return sum(math.prod(s) for role, s in shapes.items() if role in roles)

    @cached_property
    def roles(self) -> frozenset[str]:
        return frozenset(role for scheme in self.names.values() for role in scheme.values())

    def __repr__(self) -> str:
        return f"<kind {self.name}>"
