"""LoRA and LoCon: delta = up @ down, for linear layers and convs of any kernel, with an optional
Tucker core (`lora_mid`) between a 1x1 down and a 1x1 up."""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import Kind, Shapes, Tensors


class LoRA(Kind):
    name = "lora"
    label = "LoRA/LoCon"
    names: ClassVar[dict[str, dict[str, str]]] = {
        "kohya": {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid"},
        "peft": {
            "lora_A.weight": "down",
            "lora_B.weight": "up",
            "lora_B.bias": "bias",
            "lora_embedding_A": "down",
            "lora_embedding_B": "up",
        },
        "legacy": {"down.weight": "down", "up.weight": "up"},
    }

    def missing(self, roles: set[str]) -> list[str]:
        return [r for r in ("down", "up") if r not in roles]

    def check(self, shapes: Shapes) -> str | None:
        down, up, mid = shapes["down"], shapes["up"], shapes.get("mid")
        if len(down) not in (2, 4) or len(up) not in (2, 4):
            return f"down {list(down)} and up {list(up)} must be 2-D (linear) or 4-D (conv)"
        if up[1] != down[0]:
            return f"up {list(up)} has {up[1]} columns but down {list(down)} has rank {down[0]}"
        if len(up) == 4 and up[2:] != (1, 1):
            return f"up {list(up)} must be a 1x1 conv"
        if mid is not None:
            if len(mid) != 4 or mid[:2] != (down[0], down[0]):
                return f"mid {list(mid)} must be rank x rank x kh x kw with rank {down[0]}"
            if len(down) == 4 and down[2:] != (1, 1):
                return f"with a Tucker mid, down {list(down)} must be a 1x1 conv"
        bias = shapes.get("bias")
        if bias is not None and bias != (up[0],):
            return f"bias {list(bias)} does not match the {up[0]} output rows"
        return None

    def rank(self, shapes: Shapes) -> int:
        return shapes["down"][0]

    def weight_shape(self, shapes: Shapes) -> tuple[int, ...]:
        down, up, mid = shapes["down"], shapes["up"], shapes.get("mid")
        kernel = mid[2:] if mid is not None else down[2:]
        return (up[0], down[1], *kernel)

    def low_rank(self, tensors: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
        up = tensors["up"].float().flatten(1)
        down = tensors["down"].float().flatten(1)
        mid = tensors.get("mid")
        if mid is not None:
            # Fold the Tucker core into the down side: rows stay rank, columns become in x kh x kw.
            down = torch.einsum("ijkl,jr->irkl", mid.float(), down).flatten(1)
        return up, down

    def delta(self, tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
        up, down = self.low_rank(tensors)
        shapes = {role: tuple(t.shape) for role, t in tensors.items()}
        return (up @ down).reshape(self.weight_shape(shapes))
