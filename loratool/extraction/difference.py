"""TUNED - BASE for one module, formed once with everything else extract needs from a full pass.

On two CPU cores the products of an extraction are bound by memory, not arithmetic: each pass over
a 5632 x 2048 fp32 delta costs about what its thin product does. So the delta is made a block of
rows at a time, and while each block is in cache the base's energy and the delta's are taken from
it (two passes fewer per module, and no bf16 conversion pass for the base's norm); the product
with the random sketch follows at once, so the SVD starts one product ahead.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..lazy_torch import torch

ROW_BLOCK_ELEMENTS = 1 << 18  # 1 MiB of fp32 rows: with the two weights' rows, stays in L2


@dataclass
class Difference:
    delta: torch.Tensor  # fp32, the weights' shape
    energy: float  # ||delta||_F^2
    base_energy: float  # ||base||_F^2
    sketched: torch.Tensor | None  # delta (flattened to 2-D) @ sketch


class Workspace:
    """One fp32 buffer reused for every module's delta. A fresh allocation of tens of MB comes from
    the OS as untouched pages, and faulting them in on first write costs twice what forming the
    delta does (measured: 20 vs 7 ms for a 5632 x 2048 delta)."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def take(self, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        numel = shape[0] * shape[1]
        if self._buffer is None or self._buffer.numel() < numel or self._buffer.device != device:
            self._buffer = None
            self._buffer = torch.empty(numel, dtype=torch.float32, device=device)
        return self._buffer[:numel].view(shape)


def difference(
    w_base: torch.Tensor, w_tuned: torch.Tensor, sketch: torch.Tensor | None = None, space: Workspace | None = None
) -> Difference:
    """tuned - base in fp32 (no fp32 copy of either weight), with both energies (row norms in
    fp32, summed in fp64) and, given a sketch, the delta's product with it. With a `space`, the
    delta lives in its buffer: valid until the next call."""
    rows = w_base.shape[0]
    base, tuned = w_base.reshape(rows, -1), w_tuned.reshape(rows, -1)
    if space is not None:
        delta = space.take(tuned.shape, tuned.device)
    else:
        delta = torch.empty(tuned.shape, dtype=torch.float32, device=tuned.device)
    norms = torch.empty(2, rows, dtype=torch.float32, device=tuned.device)
    step = rows if delta.device.type != "cpu" else max(1, ROW_BLOCK_ELEMENTS // max(1, delta.shape[1]))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block = delta[start:stop]
        block.copy_(base[start:stop])  # the base's rows in fp32, in cache: its norm costs no conversion pass
        torch.linalg.vector_norm(block, dim=1, out=norms[1, start:stop])
        torch.sub(tuned[start:stop], block, out=block)
        torch.linalg.vector_norm(block, dim=1, out=norms[0, start:stop])
    energy, base_energy = norms.double().square().sum(dim=1).tolist()
    # One whole product: faster than one per block of rows (a thin GEMM's fixed cost per call).
    sketched = None if sketch is None else delta @ sketch
    return Difference(delta.reshape(w_tuned.shape), energy, base_energy, sketched)
