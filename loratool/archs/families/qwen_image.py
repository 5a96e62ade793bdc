"""Qwen-Image: diffusers' `QwenImageTransformer2DModel` (an MMDiT of 60 dual-stream blocks, width
3072), whose original single-file names are its diffusers names.

Qwen-Image was published in diffusers' layout, so ComfyUI's checkpoints, DiffSynth-Studio and
musubi-tuner all use diffusers' module paths (diffusers' own single-file loader maps them with the
identity): no fused weights, no swapped rows. The Edit models (Edit, Edit-2509, Edit-2511) have the
same modules and shapes, so their LoRAs read as Qwen-Image; only metadata tells them apart. The
text encoder (Qwen2.5-VL) is left out: trainers do not adapt it.
"""

from __future__ import annotations

from ._build import DIT_KOHYA, ComponentRows, TableFamily, component, on_meta

ORDER = 60

QWEN_IMAGE = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)


def qwen_target(path: str) -> str:
    """Inside the blocks everything is a default target (musubi-tuner adapts whole blocks)."""
    return "default" if path.startswith("transformer_blocks.") else "extra"


def components() -> list[ComponentRows]:
    from diffusers import QwenImageTransformer2DModel

    return [
        component(
            "transformer",
            "transformer",
            on_meta(lambda: QwenImageTransformer2DModel(**QWEN_IMAGE)),
            DIT_KOHYA,
            ["", "model.diffusion_model."],
            ["diffusion_model.", "model.diffusion_model.", ""],
            lambda path: {"native": path},
            qwen_target,
        )
    ]


FAMILY = TableFamily(
    name="qwen_image",
    title="Qwen-Image",
    order=ORDER,
    hints={"ss_base_model_version": ["qwen_image"], "modelspec.architecture": ["Qwen-Image"]},
    components=components,
    kohya_network_module="networks.lora_qwen_image",
)
