"""Chroma: diffusers' `ChromaTransformer2DModel`, a Flux.1-schnell derivative named in BFL's
single-file layout, with a T5-XXL text encoder and no CLIP.

Chroma keeps Flux.1's blocks and names but prunes every per-block modulation (`img_mod`, `txt_mod`,
`modulation`, the final `adaLN_modulation`) and the timestep/vector/guidance embedders; one
"distilled guidance layer" (an MLP approximator: `in_proj`, five residual `layers` with RMS `norms`,
`out_proj`) computes all modulations at once instead. So a LoRA on the attention and MLP projections
has the same names and shapes in both families, and only metadata tells them apart (or the
modules one of them lacks: `norm1.linear` is Flux.1's, `distilled_guidance_layer` Chroma's).
"""

from __future__ import annotations

import re

from ._build import DIT_KOHYA, ComponentRows, TableFamily, component, on_meta
from ._t5 import T5_XXL, t5_component
from .flux1 import flux_native, flux_target

ORDER = 45

# lodestones/Chroma1-HD transformer/config.json: diffusers' defaults (Flux.1's blocks and widths,
# approximator of 5 layers, width 5120, fed 64 channels).
CHROMA = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    axes_dims_rope=(16, 56, 56),
    approximator_num_channels=64,
    approximator_hidden_dim=5120,
    approximator_layers=5,
)

# Inside `distilled_guidance_layer.layers.N`: diffusers -> original.
APPROXIMATOR_LAYER = {"linear_1": "in_layer", "linear_2": "out_layer"}


def chroma_native(path: str) -> dict:
    """The original name of a diffusers Chroma module: Flux.1's rule, and the approximator's own."""
    m = re.fullmatch(r"distilled_guidance_layer\.layers\.(\d+)\.(linear_[12])", path)
    if m:
        return {"native": f"distilled_guidance_layer.layers.{m.group(1)}.{APPROXIMATOR_LAYER[m.group(2)]}"}
    m = re.fullmatch(r"distilled_guidance_layer\.norms\.(\d+)", path)
    if m:  # RMSNorms keep their weight as `scale`, as BFL's do
        native = f"distilled_guidance_layer.norms.{m.group(1)}"
        return {"native": native, "weight": native + ".scale"}
    if path.startswith("distilled_guidance_layer."):
        return {"native": path}
    return flux_native(path)


def components() -> list[ComponentRows]:
    from diffusers import ChromaTransformer2DModel

    return [
        component(
            "transformer",
            "transformer",
            on_meta(lambda: ChromaTransformer2DModel(**CHROMA)),
            DIT_KOHYA,
            ["", "model.diffusion_model."],
            ["diffusion_model.", "model.diffusion_model.", ""],
            chroma_native,
            flux_target,
        ),
        t5_component(
            "text_encoder",
            "t5",
            T5_XXL,
            # ComfyUI reads T5 as lora_te3_ (as for Flux.1); sd-scripts numbers Chroma's only encoder te1
            kohya_prefixes=["lora_te3_", "lora_te1_"],
            file_prefixes=["", "text_encoders.t5xxl.transformer."],
            lora_prefixes=["text_encoders.t5xxl.transformer."],
        ),
    ]


FAMILY = TableFamily(
    name="chroma",
    title="Chroma",
    order=ORDER,
    hints={"ss_base_model_version": ["chroma"], "modelspec.architecture": ["chroma"]},
    components=components,
    kohya_network_module="networks.lora_flux",
)
