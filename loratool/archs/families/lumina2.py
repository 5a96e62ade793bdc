"""Lumina-Image 2.0: diffusers' `Lumina2Transformer2DModel` (Alpha-VLLM's NextDiT, 2B) named in the
original single-file layout (Alpha-VLLM's checkpoints, ComfyUI's repackaged file, sd-scripts).

The model is a stack of one kind of block in three places, each kept under the same name in both
layouts: `context_refiner.N` (caption tokens, no modulation), `noise_refiner.N` (image tokens) and
`layers.N` (the joint sequence). What differs is data here:

- q/k/v are one fused `attention.qkv` per block, with grouped-query attention: q has 24 heads of 96
  rows, k and v 8 heads each, so the fused weight's row blocks are (in, in*1/3, in*1/3), not equal.
- the block's own module names (`attention.out`, `feed_forward.w1..w3`, `adaLN_modulation.1`, the
  norms `attention_norm1/2`), the embedders (`t_embedder.mlp.N`, `cap_embedder.N`) and the final
  layer (`final_layer.adaLN_modulation.1`, which holds only a scale: nothing to swap).
- the original file has a top-level `norm_final` RMSNorm the model never uses; diffusers has no
  module for it (its converter drops the key), so it has no row.

No fused rows are swapped and every norm keeps `.weight`. The text encoder (Gemma-2 2B) is left out:
trainers adapt only the DiT by default (sd-scripts can add Gemma-2 LoRAs as `lora_te_`, rarely done).
"""

from __future__ import annotations

import re
from fractions import Fraction

from ._build import DIT_KOHYA, ComponentRows, TableFamily, component, on_meta

ORDER = 90

# Alpha-VLLM/Lumina-Image-2.0 transformer/config.json (the diffusers-format release on the HF hub;
# Neta-Lumina's diffusers release has the same numbers). diffusers' own default cap_feat_dim (1024)
# is not the published model's: captions come from Gemma-2 2B, whose hidden size is 2304.
LUMINA2 = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    hidden_size=2304,
    num_layers=26,
    num_refiner_layers=2,
    num_attention_heads=24,
    num_kv_heads=8,
    multiple_of=256,
    ffn_dim_multiplier=None,
    norm_eps=1e-5,
    axes_dim_rope=(32, 32, 32),
    axes_lens=(300, 512, 512),
    cap_feat_dim=2304,
)

# Outside the blocks: diffusers -> original.
TOP = {
    "x_embedder": "x_embedder",
    "time_caption_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_caption_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_caption_embed.caption_embedder.0": "cap_embedder.0",
    "time_caption_embed.caption_embedder.1": "cap_embedder.1",
    "norm_out.linear_1": "final_layer.adaLN_modulation.1",
    "norm_out.linear_2": "final_layer.linear",
}
# Inside a block (`layers.N`, `noise_refiner.N`, `context_refiner.N`, the same in both layouts).
BLOCK = {
    "attn.to_out.0": "attention.out",
    "attn.norm_q": "attention.q_norm",
    "attn.norm_k": "attention.k_norm",
    "feed_forward.linear_1": "feed_forward.w1",
    "feed_forward.linear_2": "feed_forward.w2",
    "feed_forward.linear_3": "feed_forward.w3",
    "norm1.linear": "adaLN_modulation.1",
    "norm1.norm": "attention_norm1",  # modulated blocks: the norm inside LuminaRMSNormZero
    "norm1": "attention_norm1",  # context refiner: a plain RMSNorm
    "norm2": "attention_norm2",
    "ffn_norm1": "ffn_norm1",
    "ffn_norm2": "ffn_norm2",
}
# Row blocks of the fused `attention.qkv`: q, k, v.
FUSED = {"attn.to_q": 0, "attn.to_k": 1, "attn.to_v": 2}
BLOCKS = r"(layers|noise_refiner|context_refiner)\.(\d+)"


def qkv_sizes(config: dict) -> list[str]:
    """Rows of q, k and v as fractions of the input width: k and v have num_kv_heads of the heads."""
    kv = Fraction(config["num_kv_heads"], config["num_attention_heads"])
    return ["in", f"in*{kv.numerator}/{kv.denominator}", f"in*{kv.numerator}/{kv.denominator}"]


def native_rule(config: dict):
    """The original name of a diffusers Lumina 2 module (or its fused weight and row block)."""
    sizes = qkv_sizes(config)

    def native(path: str) -> dict:
        if path in TOP:
            return {"native": TOP[path]}
        m = re.fullmatch(BLOCKS + r"\.(.+)", path)
        if m is None:
            raise KeyError(f"no original name rule for Lumina 2 module {path}")
        block, rest = f"{m.group(1)}.{m.group(2)}", m.group(3)
        if rest in FUSED:
            return {"fused": f"{block}.attention.qkv", "part": FUSED[rest], "sizes": sizes}
        return {"native": f"{block}.{BLOCK[rest]}"}

    return native


def lumina2_target(path: str) -> str:
    """sd-scripts (`networks.lora_lumina`) adapts every Linear of the blocks and the final layer by
    default; the embedders only when asked (`embedder_dims`)."""
    return "default" if re.match(BLOCKS + r"\.", path) or path.startswith("norm_out.") else "extra"


def components() -> list[ComponentRows]:
    from diffusers import Lumina2Transformer2DModel

    return [
        component(
            "transformer",
            "transformer",
            on_meta(lambda: Lumina2Transformer2DModel(**LUMINA2)),
            DIT_KOHYA,
            ["", "model.diffusion_model."],
            ["diffusion_model.", "model.diffusion_model.", ""],
            native_rule(LUMINA2),
            lumina2_target,
        )
    ]


# sd-scripts: ss_base_model_version "lumina2" (lumina_util.MODEL_VERSION_LUMINA_V2), modelspec
# architecture "lumina-2" (+ "/lora").
FAMILY = TableFamily(
    name="lumina2",
    title="Lumina-Image 2.0",
    order=ORDER,
    hints={"ss_base_model_version": ["lumina2"], "modelspec.architecture": ["lumina-2"]},
    components=components,
    kohya_network_module="networks.lora_lumina",
)
