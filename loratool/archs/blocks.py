"""Which block of its model a module sits in, and where that block comes from input to output.

Pictures group modules by block (UNet down/mid/up, text-encoder layers, Flux double and single
blocks, LLM layers); the grouping is these tables, applied to canonical module paths.
"""

from __future__ import annotations

import math

# A path part that numbers the model's blocks, and its short label. The first such part in a
# module's path names its block: unet.down_blocks.1.attentions.0... is in "down1".
BLOCK_CONTAINERS = {
    "down_blocks": "down",
    "up_blocks": "up",
    "single_transformer_blocks": "single",
    "transformer_blocks": "block",
    "layers": "layer",
    "layer": "layer",
    "block": "block",
    "blocks": "block",
    "h": "block",
}
BLOCK_SINGLES = {"mid_block": "mid"}  # a block that has no number
# Where a kind of block sits in the model, so blocks run input to output: down, mid, up; Flux's
# double-stream blocks before its single-stream ones.
BLOCK_ORDER = {
    "down_blocks": 0,
    "mid_block": 1,
    "up_blocks": 2,
    "transformer_blocks": 0,
    "single_transformer_blocks": 1,
}
COMPONENT_ORDER = ("te", "te1", "te2", "t5", "unet", "transformer", "model")  # short component names
OTHER_BLOCK = "other"  # modules outside any numbered block (conv_in, time_embedding, lm_head, ...)


def block_of(path: str) -> tuple[float, int, str]:
    """(order of the block kind, block number, label) for a module's dotted path; modules outside
    every block sort after them."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part in BLOCK_SINGLES:
            return BLOCK_ORDER.get(part, 0), 0, BLOCK_SINGLES[part]
        if part in BLOCK_CONTAINERS and i + 1 < len(parts) and parts[i + 1].isdigit():
            number = int(parts[i + 1])
            return BLOCK_ORDER.get(part, 0), number, f"{BLOCK_CONTAINERS[part]}{number}"
    return math.inf, 0, OTHER_BLOCK


def component_position(component: str | None) -> tuple[int, str]:
    """Text encoders first, then the UNet or transformer; components no table names last."""
    name = component or "unknown"
    return (COMPONENT_ORDER.index(name) if name in COMPONENT_ORDER else len(COMPONENT_ORDER), name)


def model_position(component: str | None, path: str) -> tuple[tuple[int, str], float, int]:
    """Sort key putting a module where it runs: component, then block kind and number."""
    order, number, _ = block_of(path)
    return component_position(component), order, number
