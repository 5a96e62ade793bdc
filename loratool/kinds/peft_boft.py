"""PEFT's BOFT: a butterfly product of block-diagonal rotations of the input columns, and a scale
per output row.

Tensors `boft_R` (m, n, b, b) (m butterfly factors of n blocks over n * b input features) and
`boft_s` (out, 1). Each block's rotation is (I - S)(I + S)^-1 with S = (P - P^T) / 2. Factor i
permutes the features (block_butterfly_perm: within groups of b * 2^i, half-blocks of b / 2 at even
positions first, then odd), rotates block by block, and permutes back; M = M_(m-1) ... M_0 and the
weight becomes (W M^T) * s. PEFT has no strength for BOFT: strength m moves W a fraction m of the
way to PEFT's merged weight. No rank, no alpha.
"""

from __future__ import annotations

from typing import ClassVar

from ..lazy_torch import torch
from .base import Kind, Shapes, Tensors
from .rotations import peft_boft_cayley


def butterfly_order(features: int, blocks: int, size: int, factor: int) -> torch.Tensor:
    """The feature order of butterfly factor `factor` (0 for the first): identity for the first and
    for a single factor; else within each group of size * 2^factor features, the half-blocks of
    size / 2 taken at even positions, then at odd ones."""
    if factor == 0:
        return torch.arange(features)
    group = features // (blocks >> factor)
    half = size // 2
    per_group = group // half
    order = [*range(0, per_group, 2), *range(1, per_group, 2)]
    within = torch.cat([torch.arange(p * half, (p + 1) * half) for p in order])
    return torch.cat([start + within for start in range(0, features, group)])


class PeftBOFT(Kind):
    name = "boft-peft"
    label = "BOFT (PEFT)"
    names: ClassVar[dict[str, dict[str, str]]] = {"peft": {"boft_R": "blocks", "boft_s": "s"}}
    reads_base = True
    negative_strength = False
    stores_alpha = False
    has_alpha = False

    def missing(self, roles: set[str]) -> list[str]:
        return [name for name, role in (("boft_R", "blocks"), ("boft_s", "s")) if role not in roles]

    def check(self, shapes: Shapes) -> str | None:
        blocks, s = shapes["blocks"], shapes["s"]
        if len(blocks) != 4 or blocks[2] != blocks[3]:
            return f"boft_R {list(blocks)} must be (factors, blocks, size, size)"
        if blocks[0] > 1 and (blocks[2] % 2 or blocks[1] % (1 << (blocks[0] - 1))):
            return f"boft_R {list(blocks)}: {blocks[0]} butterfly factors need an even size and block count"
        if len(s) != 2 or 1 not in s:
            return f"boft_s {list(s)} must hold one scale per output row"
        return None

    def rank(self, shapes: Shapes) -> None:
        return None

    def block_size(self, shapes: Shapes) -> int:
        return shapes["blocks"][-1]

    def weight_shape(self, shapes: Shapes) -> tuple[int, ...]:
        _, n, b, _ = shapes["blocks"]
        return (max(shapes["s"]), n * b)

    def output_rows(self, tensors: Tensors) -> set[str]:
        return {"s"}

    def delta(self, tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
        if weight is None:
            raise ValueError("BOFT rotates the base weight; its update needs the weight")
        blocks = tensors["blocks"].float()
        factors, n, b, _ = blocks.shape
        rotations = peft_boft_cayley(blocks.reshape(-1, b, b)).reshape(blocks.shape)
        flat = weight.reshape(weight.shape[0], -1)
        columns = flat.T  # M is applied to W^T, factor 0 first
        for factor in range(factors):
            order = butterfly_order(columns.shape[0], n, b, factor if factors > 1 else 0)
            scattered = torch.empty_like(columns)
            scattered[order] = columns
            turned = (rotations[factor] @ scattered.reshape(n, b, -1)).reshape(columns.shape)
            columns = turned[order]
        scale = tensors["s"].float().reshape(-1, 1)
        return (columns.T * scale - flat).reshape(weight.shape)
