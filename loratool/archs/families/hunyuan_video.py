"""HunyuanVideo: diffusers' `HunyuanVideoTransformer3DModel` (20 dual-stream and 40 single-stream
blocks of width 3072, a Conv3d patch embedding) named in Tencent's original single-file layout.

Tencent's layout differs from diffusers' in more than names, and the differences are data here: q/k/v
are one fused `img_attn_qkv` / `txt_attn_qkv` per stream and one `self_attn_qkv` per token-refiner
block, a single block's q/k/v and MLP input are one `linear1` (as in Flux), and the final modulation
stores its (shift, scale) halves the other way round. The q/k RMSNorms keep `.weight` (BFL's Flux files
say `scale`).

The blocks are Flux.1-dev's under other names: in diffusers' names (`transformer_blocks.N.attn.to_q`,
`single_transformer_blocks.N.proj_mlp`) every module the two share has the same full-size shape, so a
LoRA on blocks 0-18 / 0-37 alone fits both and is reported as tied (Flux.1 comes first in table order).
Only the token refiner (`context_embedder.token_refiner`), the Conv3d `x_embedder.proj`, the blocks past
Flux's 19 / 38, Tencent's own names (`img_mlp.fc1`, `img_mod.linear`) and metadata tell them apart; the
kohya names of the attention (`double_blocks_N_img_attn_qkv`, `single_blocks_N_linear1`, `linear2`) are
the same in both layouts.

HunyuanVideo-I2V has the same modules (its `img_in` takes 33 latent channels in the `-33ch` model). The
text encoders (LLaVA-LLaMA-3-8B and CLIP-L) are left out: trainers (musubi-tuner, diffusion-pipe,
finetrainers) adapt only the transformer.
"""

from __future__ import annotations

import re

from ._build import DIT_KOHYA, ComponentRows, TableFamily, component, on_meta

ORDER = 210

# tencent/HunyuanVideo T2V 720p: diffusers' defaults for the class (its docstring points at that model).
HUNYUAN_VIDEO = dict(
    in_channels=16,
    out_channels=16,
    num_attention_heads=24,
    attention_head_dim=128,
    num_layers=20,
    num_single_layers=40,
    num_refiner_layers=2,
    mlp_ratio=4.0,
    patch_size=2,
    patch_size_t=1,
    qk_norm="rms_norm",
    guidance_embeds=True,
    text_embed_dim=4096,
    pooled_projection_dim=768,
    rope_theta=256.0,
    rope_axes_dim=(16, 56, 56),
)

# The text path, outside the blocks (shared with HunyuanVideo 1.5): diffusers -> Tencent.
TEXT_IN = {
    "context_embedder.time_text_embed.timestep_embedder.linear_1": "txt_in.t_embedder.mlp.0",
    "context_embedder.time_text_embed.timestep_embedder.linear_2": "txt_in.t_embedder.mlp.2",
    "context_embedder.time_text_embed.text_embedder.linear_1": "txt_in.c_embedder.linear_1",
    "context_embedder.time_text_embed.text_embedder.linear_2": "txt_in.c_embedder.linear_2",
    "context_embedder.proj_in": "txt_in.input_embedder",
}
# Inside a token-refiner block (`context_embedder.token_refiner.refiner_blocks.N` ->
# `txt_in.individual_token_refiner.blocks.N`); its modulation (two gates) is stored in diffusers' order.
REFINER = {
    "norm1": "norm1",
    "attn.to_out.0": "self_attn_proj",
    "norm2": "norm2",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
    "norm_out.linear": "adaLN_modulation.1",
}
REFINER_FUSED = {"attn.to_q": 0, "attn.to_k": 1, "attn.to_v": 2}
# Inside a dual-stream block (`transformer_blocks.N` -> `double_blocks.N`), shared with HunyuanVideo 1.5;
# the (shift, scale, gate) x 2 modulations are stored in diffusers' order.
DOUBLE = {
    "norm1.linear": "img_mod.linear",
    "norm1_context.linear": "txt_mod.linear",
    "attn.to_out.0": "img_attn_proj",
    "attn.to_add_out": "txt_attn_proj",
    "attn.norm_q": "img_attn_q_norm",
    "attn.norm_k": "img_attn_k_norm",
    "attn.norm_added_q": "txt_attn_q_norm",
    "attn.norm_added_k": "txt_attn_k_norm",
    "ff.net.0.proj": "img_mlp.fc1",
    "ff.net.2": "img_mlp.fc2",
    "ff_context.net.0.proj": "txt_mlp.fc1",
    "ff_context.net.2": "txt_mlp.fc2",
}
# Row blocks of the fused image and text qkv weights.
DOUBLE_FUSED = {
    "attn.to_q": ("img_attn_qkv", 0),
    "attn.to_k": ("img_attn_qkv", 1),
    "attn.to_v": ("img_attn_qkv", 2),
    "attn.add_q_proj": ("txt_attn_qkv", 0),
    "attn.add_k_proj": ("txt_attn_qkv", 1),
    "attn.add_v_proj": ("txt_attn_qkv", 2),
}
# Inside a single-stream block (`single_transformer_blocks.N` -> `single_blocks.N`).
SINGLE = {"norm.linear": "modulation.linear", "proj_out": "linear2", "attn.norm_q": "q_norm", "attn.norm_k": "k_norm"}
# Row blocks of a single block's fused `linear1`: q, k, v, then the MLP input (as in Flux).
SINGLE_FUSED = {"attn.to_q": 0, "attn.to_k": 1, "attn.to_v": 2, "proj_mlp": 3}
# The rest of the modules outside the blocks.
TOP = {
    "x_embedder.proj": "img_in.proj",
    "time_text_embed.timestep_embedder.linear_1": "time_in.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "time_in.mlp.2",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.mlp.0",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.mlp.2",
    "proj_out": "final_layer.linear",
    **TEXT_IN,
}
QKV = ["in", "in", "in"]


def outside_blocks(path: str, top: dict[str, str]) -> dict | None:
    """The Tencent name of a module outside the dual/single-stream blocks (shared with 1.5), or None."""
    if path == "norm_out.linear":  # Tencent orders the final modulation (shift, scale); diffusers (scale, shift)
        return {"native": "final_layer.adaLN_modulation.1", "rows": "swap_halves"}
    if path in top:
        return {"native": top[path]}
    m = re.fullmatch(r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.(.+)", path)
    if m:
        block, rest = f"txt_in.individual_token_refiner.blocks.{m.group(1)}", m.group(2)
        if rest in REFINER_FUSED:
            return {"fused": f"{block}.self_attn_qkv", "part": REFINER_FUSED[rest], "sizes": QKV}
        return {"native": f"{block}.{REFINER[rest]}"}
    return None


def hunyuan_native(path: str) -> dict:
    """The Tencent name of a diffusers HunyuanVideo module (or its fused weight and row block)."""
    found = outside_blocks(path, TOP)
    if found is not None:
        return found
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", path)
    if m:
        block, rest = f"double_blocks.{m.group(1)}", m.group(2)
        if rest in DOUBLE_FUSED:
            name, part = DOUBLE_FUSED[rest]
            return {"fused": f"{block}.{name}", "part": part, "sizes": QKV}
        return {"native": f"{block}.{DOUBLE[rest]}"}
    m = re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", path)
    if m:
        block, rest = f"single_blocks.{m.group(1)}", m.group(2)
        if rest in SINGLE_FUSED:
            return {"fused": f"{block}.linear1", "part": SINGLE_FUSED[rest]}
        return {"native": f"{block}.{SINGLE[rest]}"}
    raise KeyError(f"no Tencent name rule for HunyuanVideo module {path}")


def hunyuan_target(path: str) -> str:
    """musubi-tuner adapts the dual- and single-stream blocks; embedders and the token refiner are extra."""
    return "default" if path.startswith(("transformer_blocks.", "single_transformer_blocks.")) else "extra"


# Single files keep the transformer bare (Tencent's and ComfyUI's) or under `model.diffusion_model.`.
# LoRA files put its Tencent names under `diffusion_model.` (diffusion-pipe, ComfyUI's own saves) or
# `transformer.` (ComfyUI maps both for HunyuanVideo; diffusers' converter strips either).
FILE_PREFIXES = ["", "model.diffusion_model."]
LORA_PREFIXES = ["diffusion_model.", "transformer.", "model.diffusion_model.", ""]


def components() -> list[ComponentRows]:
    from diffusers import HunyuanVideoTransformer3DModel

    return [
        component(
            "transformer",
            "transformer",
            on_meta(lambda: HunyuanVideoTransformer3DModel(**HUNYUAN_VIDEO)),
            DIT_KOHYA,
            FILE_PREFIXES,
            LORA_PREFIXES,
            hunyuan_native,
            hunyuan_target,
        )
    ]


FAMILY = TableFamily(
    name="hunyuan_video",
    title="HunyuanVideo",
    order=ORDER,
    # musubi-tuner writes ss_base_model_version "hunyuan_video" and modelspec.architecture
    # "hunyuan-video/lora". HunyuanVideo 1.5's "hunyuan_video_1_5" starts with the first too (detection
    # takes the longest prefix: 1.5's own); the modelspec prefix keeps its slash so it names this family only.
    hints={"ss_base_model_version": ["hunyuan_video"], "modelspec.architecture": ["hunyuan-video/"]},
    components=components,
    kohya_network_module="networks.lora",
    yields_to=("flux1",),
)
