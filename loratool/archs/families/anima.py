"""Anima: NVIDIA's Cosmos-Predict2 2B DiT (diffusers' `CosmosTransformer3DModel`) with Anima's LLM
adapter (diffusers' `AnimaTextConditioner`), named in the original (MiniTrainDIT) single-file layout.

Anima is Cosmos-Predict2-2B-Text2Image fine-tuned by CircleStone Labs: the same 28 blocks of width
2048, with an LLM adapter (6 blocks of width 1024) that maps Qwen3-0.6B hidden states onto T5-token
queries in place of T5-XXL. The original file keeps both under `net.` (the adapter as
`net.llm_adapter.`); ComfyUI, sd-scripts and diffusion-pipe LoRAs name them `diffusion_model.` +
that path, sd-scripts' kohya names `lora_unet_` + it flattened, the adapter included
(`lora_unet_llm_adapter_blocks_0_self_attn_q_proj`, written only with `train_llm_adapter=true`).

The transformer's original names differ from diffusers' in words only: no fused weights, no swapped
rows (both order each modulation shift, scale, gate), q/k RMSNorms stored as `.weight`. The rules are
the reverse of diffusers' `convert_cosmos_transformer_checkpoint_to_diffusers` (Cosmos 2.0 branch)
and `_convert_non_diffusers_anima_lora_to_diffusers`, as data. The adapter's original paths are its
diffusers paths (that LoRA converter maps `llm_adapter.` to `text_conditioner.` unchanged). The text
encoder (Qwen3-0.6B) is left out: sd-scripts keeps it frozen for Anima.
"""

from __future__ import annotations

import re

from ._build import DIT_KOHYA, ComponentRows, TableFamily, component, on_meta

ORDER = 110

# diffusers' config of circlestone-labs/Anima-Base-v1.0-Diffusers transformer/config.json (the same as
# Cosmos-Predict2-2B-Text2Image's, which vLLM-Omni and OneTrainer pin verbatim): 16 heads x 128 = 2048,
# 28 blocks, text_embed_dim 1024 (the adapter's output), no learnable positional embedding.
ANIMA_TRANSFORMER = dict(
    in_channels=16,
    out_channels=16,
    num_attention_heads=16,
    attention_head_dim=128,
    num_layers=28,
    mlp_ratio=4.0,
    text_embed_dim=1024,
    adaln_lora_dim=256,
    max_size=(128, 240, 240),
    patch_size=(1, 2, 2),
    rope_scale=(1.0, 4.0, 4.0),
    concat_padding_mask=True,
    extra_pos_embed_type=None,
)
# The adapter's config: `AnimaTextConditioner`'s defaults, which vLLM-Omni pins for Anima too: 6 blocks of
# width 1024, 16 heads, Qwen3-0.6B's 1024-wide states in, T5's 32128-token vocabulary.
ANIMA_TEXT_CONDITIONER = dict(
    source_dim=1024,
    target_dim=1024,
    model_dim=1024,
    num_layers=6,
    num_attention_heads=16,
    mlp_ratio=4.0,
    target_vocab_size=32128,
    use_self_attention=True,
    use_layer_norm=False,
    min_sequence_length=512,
)

# Outside the blocks: diffusers -> original.
TOP = {
    "patch_embed.proj": "x_embedder.proj.1",
    "time_embed.t_embedder.linear_1": "t_embedder.1.linear_1",
    "time_embed.t_embedder.linear_2": "t_embedder.1.linear_2",
    "time_embed.norm": "t_embedding_norm",
    "norm_out.linear_1": "final_layer.adaln_modulation.1",
    "norm_out.linear_2": "final_layer.adaln_modulation.2",
    "proj_out": "final_layer.linear",
}
# Inside `transformer_blocks.N` -> `blocks.N`: a sub-module, then the layer in it.
BLOCK_MODULES = {
    "attn1": "self_attn",
    "attn2": "cross_attn",
}
ATTENTION = {
    "to_q": "q_proj",
    "to_k": "k_proj",
    "to_v": "v_proj",
    "to_out.0": "output_proj",
    "norm_q": "q_norm",
    "norm_k": "k_norm",
}
BLOCK = {
    "norm1.linear_1": "adaln_modulation_self_attn.1",
    "norm1.linear_2": "adaln_modulation_self_attn.2",
    "norm2.linear_1": "adaln_modulation_cross_attn.1",
    "norm2.linear_2": "adaln_modulation_cross_attn.2",
    "norm3.linear_1": "adaln_modulation_mlp.1",
    "norm3.linear_2": "adaln_modulation_mlp.2",
    "ff.net.0.proj": "mlp.layer1",
    "ff.net.2": "mlp.layer2",
}
# The attention and MLP layers: sd-scripts' default targets (its default exclude pattern
# `.*(_modulation|_norm|_embedder|final_layer).*` drops the adaLN modulations and the embedders).
DEFAULT_TARGET = re.compile(r"transformer_blocks\.\d+\.(attn[12]\.|ff\.)")


def transformer_native(path: str) -> dict:
    """The original name of a diffusers Cosmos/Anima transformer module."""
    if path in TOP:
        return {"native": TOP[path]}
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", path)
    if m is None:
        raise KeyError(f"no original name rule for Anima module {path}")
    i, rest = m.group(1), m.group(2)
    if rest in BLOCK:
        return {"native": f"blocks.{i}.{BLOCK[rest]}"}
    module, _, layer = rest.partition(".")
    if module in BLOCK_MODULES and layer in ATTENTION:
        return {"native": f"blocks.{i}.{BLOCK_MODULES[module]}.{ATTENTION[layer]}"}
    raise KeyError(f"no original name rule for Anima module {path}")


def transformer_target(path: str) -> str:
    return "default" if DEFAULT_TARGET.match(path) else "extra"


def adapter_native(path: str) -> dict:
    """The LLM adapter's original path under `llm_adapter.` is its diffusers path."""
    return {"native": path}


def adapter_target(path: str) -> str:
    """sd-scripts adapts the adapter only when asked (`train_llm_adapter=true`)."""
    return "extra"


def components() -> list[ComponentRows]:
    from diffusers import AnimaTextConditioner, CosmosTransformer3DModel

    return [
        component(
            "transformer",
            "transformer",
            on_meta(lambda: CosmosTransformer3DModel(**ANIMA_TRANSFORMER)),
            DIT_KOHYA,
            ["net.", "model.diffusion_model.", ""],
            ["diffusion_model.", "model.diffusion_model.", ""],
            transformer_native,
            transformer_target,
        ),
        component(
            "text_conditioner",
            "llm_adapter",
            on_meta(lambda: AnimaTextConditioner(**ANIMA_TEXT_CONDITIONER)),
            # sd-scripts: the adapter lives inside its DiT, so its kohya names are `lora_unet_llm_adapter_...`
            [{"prefix": "lora_unet_llm_adapter_", "paths": "native"}],
            ["net.llm_adapter.", "model.diffusion_model.llm_adapter.", "llm_adapter."],
            ["diffusion_model.llm_adapter.", "model.diffusion_model.llm_adapter."],
            adapter_native,
            adapter_target,
            comfyui={"prefix": "diffusion_model.llm_adapter.", "paths": "native"},
        ),
    ]


FAMILY = TableFamily(
    name="anima",
    title="Anima",
    order=ORDER,
    # sd-scripts writes ss_base_model_version "anima" and modelspec.architecture "anima-preview" (or
    # "anima-unknown"), "/lora" appended
    hints={"ss_base_model_version": ["anima"], "modelspec.architecture": ["anima"]},
    components=components,
    kohya_network_module="networks.lora_anima",
)
