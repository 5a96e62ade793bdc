"""LoRA and LoCon: delta = up @ down, for linear layers and convs of any kernel, with an optional
Tucker core (`lora_mid`) between a 1x1 down and a 1x1 up.

Convs may be 1-D, 2-D or 3-D (video models' Conv3d patch embeddings): down is (rank, in, *kernel),
up (out, rank, 1, ..), and the update is (out, in, *kernel), the 2-D case with more kernel axes.
"""

from __future__ import annotations

from typing import ClassVar

from ..lazy_torch import torch
from .base import Kind, Shapes, Tensors

# Factor dimensions: 2 for a linear layer, 3 to 5 for a Conv1d, Conv2d or Conv3d.
NDIMS = (2, 3, 4, 5)


class LoRA(Kind):
    name = "lora"
    label = "LoRA/LoCon"
    low_rank_product = True
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
        # mlx-lm, once its source has turned lora_a (in, r) and lora_b (r, out) (io/mlx_folder.py)
        "mlx": {"lora_a": "down", "lora_b": "up"},
        "lora_diffusion": {"down": "down", "up": "up"},  # cloneofsimo's `unet:N:down`
        # DiffSynth-Studio saves PEFT's state dict with the adapter's name left in the key
        "diffsynth": {"lora_A.default.weight": "down", "lora_B.default.weight": "up"},
    }

    def missing(self, roles: set[str]) -> list[str]:
        return [r for r in ("down", "up") if r not in roles]

    def check(self, shapes: Shapes) -> str | None:
        down, up, mid = shapes["down"], shapes["up"], shapes.get("mid")
        if len(down) not in NDIMS or len(up) not in NDIMS:
            return f"down {list(down)} and up {list(up)} must be 2-D (linear) or 3-D to 5-D (conv)"
        if len(down) > 2 and len(up) > 2 and len(down) != len(up):
            return f"down {list(down)} and up {list(up)} must be convs of the same dimension"
        if up[1] != down[0]:
            return f"up {list(up)} has {up[1]} columns but down {list(down)} has rank {down[0]}"
        if any(k != 1 for k in up[2:]):
            kernel = "x".join(["1"] * (len(up) - 2)) if len(up) > 3 else "kernel-1"
            return f"up {list(up)} must be a {kernel} conv"
        if mid is not None:  # the Tucker core is a 2-D conv kernel (LyCORIS's Conv2d Tucker)
            if len(mid) != 4 or mid[:2] != (down[0], down[0]):
                return f"mid {list(mid)} must be rank x rank x kh x kw with rank {down[0]}"
            if down[2:] not in ((), (1, 1)):
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
