"""LyCORIS's BOFT (`boft`): a butterfly product of block-diagonal rotations of the output rows.

Tensors: `oft_blocks` (m, n, b, b), m stages of n blocks of size b over n * b output rows (told
apart from OFT's (n, b, b) by that fourth axis), optional `rescale`, and `alpha` as OFT's: the norm
constraint per output row, clipping all stages' Q together. Stage i pairs rows 2^i * b/2 apart: the
rows are grouped (c, 2, k) with k = 2^i * b/2, regrouped (c, k, 2) into blocks of b, each block
left-multiplied by its rotation R (not its transpose, unlike OFT), and put back. At strength m
every stage's R becomes m R + (1 - m) I; the rescale multiplies the result unscaled.
"""

from __future__ import annotations

from ..lazy_torch import torch
from .base import Shapes
from .oft import LycorisRotation
from .rotations import rotate_row_blocks


class BOFT(LycorisRotation):
    name = "boft"
    label = "BOFT"
    stage_axes = 1

    def check(self, shapes: Shapes) -> str | None:
        problem = super().check(shapes)
        if problem is not None:
            return problem
        stages, n, b, _ = shapes["blocks"]
        if b % 2 or n % (1 << (stages - 1)):
            need = f"an even size and a multiple of {1 << (stages - 1)} blocks"
            return f"oft_blocks {list(shapes['blocks'])}: {stages} butterfly stages need {need}"
        return None

    def turn(self, rows: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        out, count = rows, rows.shape[0]
        half = rotations.shape[-1] // 2
        for stage, blocks in enumerate(rotations):
            k = (1 << stage) * half
            paired = out.reshape(-1, 2, k, out.shape[1]).transpose(1, 2).reshape(count, -1)
            turned = rotate_row_blocks(paired, blocks, transpose=False)
            out = turned.reshape(-1, k, 2, out.shape[1]).transpose(1, 2).reshape(count, -1)
        return out
