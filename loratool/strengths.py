"""Per-LoRA strengths as commands take them: one `-w` per LoRA, in their order, or none (1.0 each)."""

from __future__ import annotations

from collections.abc import Sequence

from .errors import LoratoolError


def lora_weights(
    loras: Sequence[object], weights: Sequence[float] | None, error: type[LoratoolError], verb: str
) -> list[float]:
    """The weight of each LoRA; `error` (the command's own error class) when the counts differ."""
    if not loras:
        raise error(f"give at least one LoRA to {verb}")
    if not weights:
        return [1.0] * len(loras)
    if len(weights) != len(loras):
        raise error(f"{len(weights)} weight(s) for {len(loras)} LoRA(s): give one -w per LoRA, in their order")
    return [float(w) for w in weights]
