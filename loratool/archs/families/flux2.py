"""Flux.2: diffusers' `Flux2Transformer2DModel` named in Black Forest Labs' single-file layout.

Three variants, each its own table because width and depth differ: FLUX.2 [dev] (8 double and 48
single blocks of width 6144), FLUX.2 [klein] 4B (5 + 20 blocks, width 3072) and FLUX.2 [klein] 9B
(8 + 24 blocks, width 4096). The klein base (undistilled) models have the same modules and shapes as
the distilled ones, so their LoRAs read as the same variant; only metadata tells them apart.

What differs from Flux.1, as data here: the modulations are not per block but three shared linears
outside the blocks (`double_stream_modulation_img.lin`, `double_stream_modulation_txt.lin`,
`single_stream_modulation.lin`), the MLPs are SwiGLU (`ff.linear_in` holds gate and value rows), and
a single block's fused q/k/v + MLP input is already one module in diffusers too
(`attn.to_qkv_mlp_proj` = BFL `linear1`), so it is a plain one-to-one name, not a fused group. Only
the double blocks' q/k/v are fused (`img_attn.qkv`, `txt_attn.qkv`); the q/k RMSNorms store their
weight as `scale`, and the final modulation's (shift, scale) halves are stored the other way round
(diffusers' single-file converter swaps them), as in Flux.1.

The text encoders (Mistral Small 3.1 for [dev], Qwen3 for [klein]) are LLMs that trainers
(musubi-tuner, ai-toolkit, diffusers' scripts) do not adapt, so they are left out.
"""

from __future__ import annotations

import re

from ._build import DIT_KOHYA, ComponentRows, TableFamily, component, on_meta
from .flux1 import FLUX_DOUBLE_FUSED, FLUX_DOUBLE_NORMS, FLUX_SINGLE_NORMS, bfl_norm

ORDER = 70

# Published configs: diffusers' scripts/convert_flux2_to_diffusers.py, `get_flux2_transformer_config`
# ("flux2-dev" = black-forest-labs/FLUX.2-dev, "klein-4b", "klein-9b"); the [dev] numbers are also
# Flux2Transformer2DModel's defaults. Everything not given here (patch_size 1, in_channels 128,
# attention_head_dim 128, mlp_ratio 3, timestep_guidance_channels 256) is the same in all three.
FLUX2_DEV = dict(
    patch_size=1,
    in_channels=128,
    num_layers=8,
    num_single_layers=48,
    attention_head_dim=128,
    num_attention_heads=48,
    joint_attention_dim=15360,
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32),
    guidance_embeds=True,
)
KLEIN = dict(FLUX2_DEV, guidance_embeds=False)  # no guidance embedder
FLUX2_KLEIN_4B = dict(KLEIN, num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680)
FLUX2_KLEIN_9B = dict(KLEIN, num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288)

# Outside the blocks: diffusers -> BFL.
TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
}
# Inside a double-stream block (`transformer_blocks.N` -> `double_blocks.N`).
DOUBLE = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
# The double blocks' fused qkv row blocks and q/k norms are named as in Flux.1.
DOUBLE_FUSED, DOUBLE_NORMS = FLUX_DOUBLE_FUSED, FLUX_DOUBLE_NORMS
# Inside a single-stream block (`single_transformer_blocks.N` -> `single_blocks.N`): diffusers keeps
# BFL's fused `linear1` as one module, so nothing is split here.
SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
SINGLE_NORMS = FLUX_SINGLE_NORMS


def flux2_native(path: str) -> dict:
    """The BFL name of a diffusers Flux.2 transformer module (or its fused weight and row block)."""
    if path == "norm_out.linear":  # BFL orders the modulation (shift, scale); diffusers (scale, shift)
        return {"native": "final_layer.adaLN_modulation.1", "rows": "swap_halves"}
    if path in TOP:
        return {"native": TOP[path]}
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", path)
    if m:
        stem, rest = f"double_blocks.{m.group(1)}", m.group(2)
        if rest in DOUBLE_FUSED:
            name, part = DOUBLE_FUSED[rest]
            return {"fused": f"{stem}.{name}", "part": part}
        if rest in DOUBLE_NORMS:
            return bfl_norm(f"{stem}.{DOUBLE_NORMS[rest]}")
        return {"native": f"{stem}.{DOUBLE[rest]}"}
    m = re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", path)
    if m:
        stem, rest = f"single_blocks.{m.group(1)}", m.group(2)
        if rest in SINGLE_NORMS:
            return bfl_norm(f"{stem}.{SINGLE_NORMS[rest]}")
        return {"native": f"{stem}.{SINGLE[rest]}"}
    raise KeyError(f"no BFL name rule for Flux.2 module {path}")


def flux2_target(path: str) -> str:
    """musubi-tuner adapts every Linear inside the double and single blocks (the modulations are
    outside them); embedders, modulations and the final layer are extra."""
    return "default" if path.startswith(("transformer_blocks.", "single_transformer_blocks.")) else "extra"


def components(config: dict) -> list[ComponentRows]:
    from diffusers import Flux2Transformer2DModel

    return [
        component(
            "transformer",
            "transformer",
            on_meta(lambda: Flux2Transformer2DModel(**config)),
            DIT_KOHYA,
            # BFL's and ComfyUI's files keep bare keys (diffusers' single-file loader reads only those)
            ["", "model.diffusion_model."],
            ["diffusion_model.", "model.diffusion_model.", ""],
            flux2_native,
            flux2_target,
        )
    ]


def variant(name: str, title: str, order: int, config: dict, base_version: str, architecture: str) -> TableFamily:
    # musubi-tuner writes ss_base_model_version "flux_2_dev" / "flux_2_klein_4b" / "flux_2_klein_9b"
    # and modelspec.architecture "Flux.2-dev" / "Flux.2-klein-4b" / "Flux.2-klein-9b" (+ "/lora").
    return TableFamily(
        name=name,
        title=title,
        order=order,
        hints={"ss_base_model_version": [base_version], "modelspec.architecture": [architecture]},
        components=lambda: components(config),
        kohya_network_module="networks.lora_flux_2",  # musubi-tuner
    )


VARIANTS = (
    variant("flux2", "FLUX.2 [dev]", ORDER, FLUX2_DEV, "flux_2_dev", "Flux.2-dev"),
    variant("flux2-klein-4b", "FLUX.2 [klein] 4B", ORDER + 2, FLUX2_KLEIN_4B, "flux_2_klein_4b", "Flux.2-klein-4b"),
    variant("flux2-klein-9b", "FLUX.2 [klein] 9B", ORDER + 4, FLUX2_KLEIN_9B, "flux_2_klein_9b", "Flux.2-klein-9b"),
)
