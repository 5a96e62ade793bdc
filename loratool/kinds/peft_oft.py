"""PEFT's OFT (PEFT >= 0.14): a block-diagonal rotation of the weight's input columns.

Tensor `oft_R.weight` (r, b (b - 1) / 2): each of the r blocks' skew-symmetric Q as its packed strict
upper triangle (one shared block with `block_share`, repeated over the input). The weight becomes
W R^T (conv weights flattened to (out, in * kh * kw)), R block-diagonal. How R is formed comes from
the config (`configured`): COFT's per-block norm clip (`coft`, `eps`), then the exact Cayley
transform or its Neumann series (`use_cayley_neumann`, `num_cayley_neumann_terms`); see
kinds/rotations.py. PEFT has no strength for OFT: strength m moves W a fraction m of the way to
PEFT's merged weight (m = 1: merge_and_unload's). No rank, no alpha.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..lazy_torch import torch
from .base import ANY, Kind, Shapes, Tensors
from .rotations import peft_coft, peft_oft_cayley, skew_from_upper


@dataclass(frozen=True)
class OftSettings:
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    neumann_terms: int | None = 5  # None: the exact Cayley transform


class PeftOFT(Kind):
    name = "oft-peft"
    label = "OFT (PEFT)"
    names: ClassVar[dict[str, dict[str, str]]] = {"peft": {"oft_R.weight": "packed"}}
    reads_base = True
    negative_strength = False
    stores_alpha = False
    has_alpha = False

    def __init__(self, settings: OftSettings | None = None) -> None:
        self.settings = settings or OftSettings()

    def configured(self, config: dict) -> PeftOFT:
        neumann = config.get("use_cayley_neumann", True)
        return PeftOFT(
            OftSettings(
                coft=bool(config.get("coft", False)),
                eps=float(config.get("eps", 6e-5)),
                block_share=bool(config.get("block_share", False)),
                neumann_terms=int(config.get("num_cayley_neumann_terms", 5)) if neumann else None,
            )
        )

    def missing(self, roles: set[str]) -> list[str]:
        return [] if "packed" in roles else ["oft_R.weight"]

    def check(self, shapes: Shapes) -> str | None:
        packed = shapes["packed"]
        if len(packed) != 2 or self._size(packed[1]) is None:
            return f"oft_R.weight {list(packed)} must be (blocks, b (b - 1) / 2) for some block size b"
        if self.settings.block_share and packed[0] != 1:
            return f"oft_R.weight {list(packed)}: with block_share the config says one shared block"
        return None

    @staticmethod
    def _size(elements: int) -> int | None:
        size = (1 + math.isqrt(1 + 8 * elements)) // 2
        return size if size * (size - 1) // 2 == elements and size > 1 else None

    def rank(self, shapes: Shapes) -> None:
        return None

    def block_size(self, shapes: Shapes) -> int | None:
        return self._size(shapes["packed"][1])

    def weight_shape(self, shapes: Shapes) -> tuple[int, ...]:
        blocks, elements = shapes["packed"]
        return (ANY, ANY) if self.settings.block_share else (ANY, blocks * (self._size(elements) or 0))

    def rotations(self, packed: torch.Tensor, columns: int) -> torch.Tensor:
        """The (n, b, b) blocks of R over `columns` input features."""
        size = self._size(packed.shape[1]) or 0
        q = skew_from_upper(packed.float(), size)
        if self.settings.coft:
            q = peft_coft(q, self.settings.eps)
        r = peft_oft_cayley(q, self.settings.neumann_terms)
        return r.expand(columns // size, size, size) if self.settings.block_share else r

    def delta(self, tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
        if weight is None:
            raise ValueError("OFT rotates the base weight; its update needs the weight")
        flat = weight.reshape(weight.shape[0], -1)
        r = self.rotations(tensors["packed"], flat.shape[1])
        n, b, _ = r.shape
        turned = (flat.reshape(-1, n, 1, b) @ r.transpose(-1, -2)).reshape(flat.shape)  # W R^T, block by block
        return (turned - flat).reshape(weight.shape)
