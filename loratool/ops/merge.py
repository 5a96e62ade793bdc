"""The arithmetic of baking a LoRA into a weight, on whatever device the caller chose.

Updates happen on an fp32 copy of the stored weight, and the caller casts the result back once:
adding in fp16/bf16 loses small updates (PEFT issue 1388). `addmm_` adds `up @ down` into the
weight's rows without materialising the dense update beside it, so a merge costs one fp32 weight
of memory whatever the rank.
"""

from __future__ import annotations

from ..lazy_torch import torch


def update_view(weight: torch.Tensor, transposed: bool, rows: tuple[int, int] | None) -> torch.Tensor:
    """The part of `weight` a module updates, as a 2-D view in the update's (out, in) orientation.

    `transposed`: the weight is stored (in, out) (GPT-2 Conv1D, embeddings, OpenCLIP projections);
    `rows`: the module is one row block of a fused weight. Conv kernels fold into the columns.
    """
    view = weight.t() if transposed else weight
    if rows is not None:
        view = view[rows[0] : rows[1]]
    return view if view.dim() == 2 else view.view(view.shape[0], -1)


def add_update(target: torch.Tensor, up: torch.Tensor, down: torch.Tensor | None, factor: float) -> None:
    """target += factor * up @ down in place; with `down` None, `up` is the dense update itself."""
    if down is None:
        target.add_(up.view(target.shape), alpha=factor)
    else:
        target.addmm_(up, down, alpha=factor)


def fits(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether every value of an fp32 `tensor` is finite and inside `dtype`'s range."""
    if tensor.numel() == 0 or not dtype.is_floating_point:
        return True
    low, high = torch.aminmax(tensor)  # one pass, no temporary; NaN propagates to both
    limit = torch.finfo(dtype).max
    return bool((high <= limit) & (low >= -limit))
