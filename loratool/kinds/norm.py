"""Norm diff (LyCORIS `norm`): a normalization layer's trained scale and shift stored as
differences, `w_norm` for the weight and `b_norm` for the bias. W' = W + m * w_norm, with no alpha
and no rank, exactly like a full diff of a one-dimensional weight."""

from __future__ import annotations

from typing import ClassVar

from .full import FullDiff


class NormDiff(FullDiff):
    name = "norm"
    label = "norm diff"
    names: ClassVar[dict[str, dict[str, str]]] = {"kohya": {"w_norm": "diff", "b_norm": "bias"}}
