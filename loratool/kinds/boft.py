"""LyCORIS's BOFT (`boft`): a butterfly product of block-diagonal rotations of the output rows.

Tensors: `oft_blocks` (m, n, b, b), m stages of n blocks of size b over n * b output rows (told
apart from OFT's (n, b, b) by that fourth axis), optional `rescale`, and `alpha` as OFT's: the norm
constraint per output row, clipping all stages' Q together. Stage i pairs rows 2^i * b/2 apart: the
rows are grouped (c, 2, k) with k = 2^i * b/2, regrouped (c, k, 2) into blocks of b, each block
left-multiplied by its rotation R (not its transpose, unlike OFT), and put back. At strength m
every stage's R becomes m R + (1 - m) I; the rescale multiplies the result unscaled.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from .base import ANY, Kind, Shapes, Tensors
from .oft import NAMES, constraint_of, rescale_problem
from .rotations import lycoris_cayley, rotate_row_blocks


class BOFT(Kind):
    name = "boft"
    label = "BOFT"
    names: ClassVar[dict[str, dict[str, str]]] = NAMES
    reads_base = True
    negative_strength = False
    has_alpha = False
    alpha_role = "constraint"
    strength_inside = True
    whole_weight = True
    flag_roles: ClassVar[tuple[str, ...]] = ("constraint",)

    def variant(self, shapes: Shapes) -> str:
        return "oft" if len(shapes["blocks"]) == 3 else self.name

    def missing(self, roles: set[str]) -> list[str]:
        return [] if "blocks" in roles else ["oft_blocks"]

    def check(self, shapes: Shapes) -> str | None:
        blocks = shapes["blocks"]
        if len(blocks) != 4 or blocks[2] != blocks[3] or blocks[2] % 2:
            return f"oft_blocks {list(blocks)} must be (stages, blocks, size, size) with an even size"
        stages, n, b = blocks[0], blocks[1], blocks[2]
        if n % (1 << (stages - 1)):
            return f"oft_blocks {list(blocks)}: {stages} butterfly stages need a multiple of {1 << (stages - 1)} blocks"
        if math.prod(shapes.get("constraint", ())) != 1:
            return f"alpha (the constraint) must hold one value, got shape {list(shapes['constraint'])}"
        return rescale_problem(shapes, n * b)

    def rank(self, shapes: Shapes) -> None:
        return None

    def block_size(self, shapes: Shapes) -> int:
        return shapes["blocks"][-1]

    def weight_shape(self, shapes: Shapes) -> tuple[int, ...]:
        blocks = shapes["blocks"]
        return (blocks[1] * blocks[2], ANY)

    def merged(self, tensors: Tensors, weight: torch.Tensor, strength: float) -> torch.Tensor:
        rows = weight.shape[0]
        rotations = lycoris_cayley(tensors["blocks"].float(), constraint_of(tensors, rows))
        if strength != 1:
            eye = torch.eye(rotations.shape[-1])
            rotations = strength * rotations + (1 - strength) * eye
        out = weight.reshape(rows, -1)
        half = rotations.shape[-1] // 2
        for stage, blocks in enumerate(rotations):
            k = (1 << stage) * half
            paired = out.reshape(-1, 2, k, out.shape[1]).transpose(1, 2).reshape(rows, -1)
            turned = rotate_row_blocks(paired, blocks, transpose=False)
            out = turned.reshape(-1, k, 2, out.shape[1]).transpose(1, 2).reshape(rows, -1)
        if "rescale" in tensors:
            out = out * tensors["rescale"].float().reshape(-1, 1)
        return out.reshape(weight.shape)

    def delta(self, tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
        if weight is None:
            raise ValueError("BOFT rotates the base weight; its update needs the weight")
        return self.merged(tensors, weight, 1.0) - weight
