"""Regenerate `loratool/archs/tables/*.json` from the reference implementations.

    python -m loratool.archs.generate

Each architecture's models are built on the meta device from their published configs (no weights,
no downloads) with diffusers and transformers, and every Linear, Conv and Embedding module becomes
one table row, as does every normalization layer with a learned weight (LayerNorm, GroupNorm,
RMSNorm, T5's LayerNorm: type and target "norm", which LyCORIS's norm algorithm trains). The row
also records the module's name in the original single-file layout (LDM/sgm, OpenCLIP, BFL), which
this script derives from the block structure; `tests/test_archs.py` checks those names against
diffusers' own single-file converters. diffusers and transformers are needed
only here and in tests, never at run time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from transformers import CLIPTextModelWithProjection

TABLES = Path(__file__).with_name("tables")

# -- published configs (full size) ------------------------------------------------------------------
SD1_UNET = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD2_UNET = dict(SD1_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SDXL_UNET = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
OPENCLIP_H = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    hidden_act="gelu",
    projection_dim=512,
)
OPENCLIP_BIGG = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
)
T5_XXL = dict(
    d_model=4096,
    d_ff=10240,
    d_kv=64,
    num_heads=64,
    num_layers=24,
    vocab_size=32128,
    feed_forward_proj="gated-gelu",
    is_encoder_decoder=False,
)
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

Row = dict[str, object]


def _is_norm(mod: object) -> bool:
    """A normalization layer with a learned per-channel weight: LayerNorm (elementwise_affine),
    GroupNorm (affine), RMSNorm (torch's or diffusers') and T5's LayerNorm. Norms without a weight
    (Flux's modulated LayerNorms) have nothing to train and are left out."""
    import torch.nn as nn

    norm_class = isinstance(mod, (nn.LayerNorm, nn.GroupNorm)) or type(mod).__name__.endswith(
        ("RMSNorm", "LayerNorm", "GroupNorm")
    )
    weight = getattr(mod, "weight", None)
    return norm_class and isinstance(weight, nn.Parameter) and weight.dim() == 1


def _modules(model: object) -> Iterator[tuple[str, str, list[int]]]:
    import torch.nn as nn

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            yield name, "linear", [mod.out_features, mod.in_features]
        elif isinstance(mod, nn.Conv2d):
            yield name, "conv", list(mod.weight.shape)
        elif isinstance(mod, nn.Embedding):
            yield name, "embedding", [mod.num_embeddings, mod.embedding_dim]
        elif _is_norm(mod):
            yield name, "norm", list(mod.weight.shape)


# -- UNet: diffusers path -> LDM/sgm path --------------------------------------------------------------
RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def unet_native(path: str, config: dict) -> str:
    lpb = config["layers_per_block"]
    has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    if path in UNET_TOP:
        return UNET_TOP[path]
    m = re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", path)
    if m:
        where, b, part, layer, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if where == "down_blocks":
            if part == "downsamplers":
                return f"input_blocks.{1 + b * (lpb + 1) + lpb}.0.op"
            block, inner = 1 + b * (lpb + 1) + layer, 0 if part == "resnets" else 1
            return f"input_blocks.{block}.{inner}.{RESNET_PARTS.get(rest, rest) if inner == 0 else rest}"
        if part == "upsamplers":
            return f"output_blocks.{b * (lpb + 1) + lpb}.{2 if has_attn[b] else 1}.conv"
        block, inner = b * (lpb + 1) + layer, 0 if part == "resnets" else 1
        return f"output_blocks.{block}.{inner}.{RESNET_PARTS.get(rest, rest) if inner == 0 else rest}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        part, layer, rest = m.group(1), int(m.group(2)), m.group(3)
        if part == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * layer}.{RESNET_PARTS.get(rest, rest)}"
    raise KeyError(f"no LDM name rule for UNet module {path}")


def unet_target(path: str) -> str:
    if ".attentions." in path:
        return "default"
    if ".resnets." in path or "samplers." in path:
        return "conv"
    return "extra"


# -- text encoders ------------------------------------------------------------------------------------
OPENCLIP_PARTS = {
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
}


def openclip_native(path: str) -> dict:
    """OpenCLIP names; q/k/v are row slices of one fused `in_proj_weight`."""
    if path == "text_model.embeddings.token_embedding":
        return {"native": "token_embedding"}
    if path == "text_model.final_layer_norm":
        return {"native": "ln_final"}
    if path == "text_projection":  # OpenCLIP stores the projection as a bare (in, out) parameter
        return {"native": "text_projection", "weight": "text_projection", "transposed": True}
    m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", path)
    if m:
        i, rest = m.group(1), m.group(2)
        qkv = re.fullmatch(r"self_attn\.([qkv])_proj", rest)
        if qkv:
            return {"fused": f"transformer.resblocks.{i}.attn.in_proj", "part": "qkv".index(qkv.group(1))}
        return {"native": f"transformer.resblocks.{i}.{OPENCLIP_PARTS[rest]}"}
    return {}  # position embedding: a bare parameter in OpenCLIP, not a module


def te_target(path: str) -> str:
    return "default" if re.search(r"\.(self_attn|mlp|SelfAttention|DenseReluDense)\.", path) else "extra"


# -- Flux: diffusers path -> BFL path --------------------------------------------------------------------
FLUX_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
FLUX_DOUBLE_FUSED = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
}
FLUX_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
# q/k RMSNorms: BFL keeps them in a QKNorm module and calls their weight `scale`.
FLUX_DOUBLE_NORMS = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
FLUX_SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
FLUX_SINGLE_FUSED = {"attn.to_q": 0, "attn.to_k": 1, "attn.to_v": 2, "proj_mlp": 3}
FLUX_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}


def flux_native(path: str) -> dict:
    if path == "norm_out.linear":  # BFL orders the modulation (shift, scale); diffusers (scale, shift)
        return {"native": "final_layer.adaLN_modulation.1", "rows": "swap_halves"}
    if path in FLUX_TOP:
        return {"native": FLUX_TOP[path]}
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", path)
    if m:
        i, rest = m.group(1), m.group(2)
        if rest in FLUX_DOUBLE_FUSED:
            name, part = FLUX_DOUBLE_FUSED[rest]
            return {"fused": f"double_blocks.{i}.{name}", "part": part}
        if rest in FLUX_DOUBLE_NORMS:
            return _bfl_norm(f"double_blocks.{i}.{FLUX_DOUBLE_NORMS[rest]}")
        return {"native": f"double_blocks.{i}.{FLUX_DOUBLE[rest]}"}
    m = re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", path)
    if m:
        i, rest = m.group(1), m.group(2)
        if rest in FLUX_SINGLE_FUSED:
            return {"fused": f"single_blocks.{i}.linear1", "part": FLUX_SINGLE_FUSED[rest]}
        if rest in FLUX_SINGLE_NORMS:
            return _bfl_norm(f"single_blocks.{i}.{FLUX_SINGLE_NORMS[rest]}")
        return {"native": f"single_blocks.{i}.{FLUX_SINGLE[rest]}"}
    raise KeyError(f"no BFL name rule for Flux module {path}")


def _bfl_norm(native: str) -> dict:
    return {"native": native, "weight": native + ".scale"}


def flux_target(path: str) -> str:
    return "default" if path.startswith(("transformer_blocks.", "single_transformer_blocks.")) else "extra"


FUSED_SIZES = {"in_proj": ["in", "in", "in"], "qkv": ["in", "in", "in"], "linear1": ["in", "in", "in", "rest"]}


# -- assembling a table ------------------------------------------------------------------------------------
def component(
    name: str,
    short: str,
    model: object,
    kohya: list[dict],
    file_prefixes: list[str],
    lora_prefixes: list[str],
    native: Callable[[str], dict],
    target: Callable[[str], str],
    add_level: str = "",
    optional_levels: tuple[str, ...] = (),
) -> tuple[dict, list[Row], dict[str, Row]]:
    rows: list[Row] = []
    fused: dict[str, Row] = {}
    for path, kind, shape in _modules(model):
        if add_level and not path.startswith(add_level) and path != "text_projection":
            path = add_level + path
        # Norms are never a default target: LyCORIS's norm algorithm trains them, plain LoRA does not.
        row: Row = {
            "name": f"{name}.{path}",
            "type": kind,
            "shape": shape,
            "target": "norm" if kind == "norm" else target(path),
        }
        extra = native(path)
        if not extra:
            continue
        row.update(extra)
        if "fused" in extra:
            group_name = f"{name}.{extra['fused']}"
            row["fused"] = group_name
            group = fused.setdefault(
                group_name,
                {
                    "name": group_name,
                    "native": extra["fused"],
                    "weight": extra["fused"] + ("_weight" if extra["fused"].endswith("in_proj") else ".weight"),
                    "sizes": FUSED_SIZES[extra["fused"].rsplit(".", 1)[1]],
                    "parts": [],
                },
            )
            while len(group["parts"]) <= extra["part"]:
                group["parts"].append(None)
            group["parts"][extra["part"]] = row["name"]
        rows.append(row)
    for group in fused.values():
        assert None not in group["parts"] and len(group["parts"]) == len(group["sizes"]), group
    info = {
        "name": name,
        "short": short,
        "kohya": kohya,
        "file_prefixes": file_prefixes,
        "lora_prefixes": lora_prefixes,
    }
    if optional_levels:
        info["optional_levels"] = list(optional_levels)
    return info, rows, fused


def _meta(build: Callable[[], object]) -> object:
    import torch

    with torch.device("meta"):
        return build()


def unet(config: dict) -> object:
    from diffusers import UNet2DConditionModel

    return _meta(lambda: UNet2DConditionModel(**config))


def clip(config: dict, with_projection: bool) -> object:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return _meta(lambda: cls(CLIPTextConfig(**config)))


def clip_component(
    name: str,
    short: str,
    model: object,
    kohya_prefix: str,
    file_prefixes: list[str],
    lora_prefixes: list[str],
    openclip: bool,
) -> tuple[dict, list[Row], dict[str, Row]]:
    """HF CLIP modules, always named with `text_model.` as single files and kohya do.

    transformers 5 dropped that level from CLIPTextModel (not from CLIPTextModelWithProjection), so
    for CLIP-L files written by either generation resolve: the level is optional there.
    """
    native = openclip_native if openclip else (lambda p: {"native": p})
    optional = () if isinstance(model, CLIPTextModelWithProjection) else ("text_model.",)
    return component(
        name,
        short,
        model,
        [{"prefix": kohya_prefix, "paths": "name"}],
        file_prefixes,
        lora_prefixes,
        native,
        te_target,
        add_level="text_model.",
        optional_levels=optional,
    )


def build_tables() -> dict[str, dict]:
    import diffusers
    import transformers
    from diffusers import FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    sources = {"diffusers": diffusers.__version__, "transformers": transformers.__version__}
    ldm_unet = ["model.diffusion_model."]
    unet_lora = ["diffusion_model.", "model.diffusion_model."]

    def sd_unet(config: dict, kohya_paths: list[dict]) -> tuple[dict, list[Row], dict[str, Row]]:
        return component(
            "unet",
            "unet",
            unet(config),
            kohya_paths,
            ldm_unet,
            unet_lora,
            lambda p: {"native": unet_native(p, config)},
            unet_target,
        )

    tables = {
        "sd1": {
            "title": "Stable Diffusion 1.x",
            "hints": {"ss_base_model_version": ["sd_v1"], "modelspec.architecture": ["stable-diffusion-v1"]},
            "components": [
                sd_unet(SD1_UNET, [{"prefix": "lora_unet_", "paths": "name"}]),
                clip_component(
                    "text_encoder",
                    "te",
                    clip(CLIP_L, False),
                    "lora_te_",
                    ["cond_stage_model.transformer."],
                    ["cond_stage_model.transformer.", "text_encoders.clip_l.transformer."],
                    openclip=False,
                ),
            ],
        },
        "sd2": {
            "title": "Stable Diffusion 2.x",
            "hints": {
                "ss_base_model_version": ["sd_v2"],
                "modelspec.architecture": ["stable-diffusion-v2"],
                "ss_v2": ["True"],
            },
            "components": [
                sd_unet(SD2_UNET, [{"prefix": "lora_unet_", "paths": "name"}]),
                clip_component(
                    "text_encoder",
                    "te",
                    clip(OPENCLIP_H, False),
                    "lora_te_",
                    ["cond_stage_model.model."],
                    ["cond_stage_model.model."],
                    openclip=True,
                ),
            ],
        },
        "sdxl": {
            "title": "Stable Diffusion XL",
            "hints": {"ss_base_model_version": ["sdxl"], "modelspec.architecture": ["stable-diffusion-xl"]},
            "components": [
                sd_unet(
                    SDXL_UNET, [{"prefix": "lora_unet_", "paths": "native"}, {"prefix": "lora_unet_", "paths": "name"}]
                ),
                clip_component(
                    "text_encoder",
                    "te1",
                    clip(CLIP_L, False),
                    "lora_te1_",
                    ["conditioner.embedders.0.transformer."],
                    ["conditioner.embedders.0.transformer.", "text_encoders.clip_l.transformer."],
                    openclip=False,
                ),
                clip_component(
                    "text_encoder_2",
                    "te2",
                    clip(OPENCLIP_BIGG, True),
                    "lora_te2_",
                    ["conditioner.embedders.1.model."],
                    ["conditioner.embedders.1.model."],
                    openclip=True,
                ),
            ],
        },
        "flux1": {
            "title": "Flux.1",
            "hints": {"ss_base_model_version": ["flux1"], "modelspec.architecture": ["flux-1"]},
            "components": [
                component(
                    "transformer",
                    "transformer",
                    _meta(lambda: FluxTransformer2DModel(**FLUX_DEV)),
                    [{"prefix": "lora_unet_", "paths": "native"}, {"prefix": "lora_transformer_", "paths": "name"}],
                    ["", "model.diffusion_model."],
                    ["diffusion_model.", "model.diffusion_model.", ""],
                    flux_native,
                    flux_target,
                ),
                clip_component(
                    "text_encoder",
                    "te1",
                    clip(CLIP_L, False),
                    "lora_te1_",
                    ["", "text_encoders.clip_l.transformer."],
                    ["text_encoders.clip_l.transformer."],
                    openclip=False,
                ),
                component(
                    "text_encoder_2",
                    "t5",
                    _meta(lambda: T5EncoderModel(T5Config(**T5_XXL))),
                    [{"prefix": "lora_te3_", "paths": "name"}],
                    ["", "text_encoders.t5xxl.transformer."],
                    ["text_encoders.t5xxl.transformer."],
                    lambda p: {"native": p},
                    te_target,
                ),
            ],
        },
    }
    out = {}
    for arch, spec in tables.items():
        components, modules, fused = [], [], []
        for info, rows, groups in spec["components"]:
            components.append(info)
            modules.extend(rows)
            fused.extend(groups.values())
        out[arch] = {
            "arch": arch,
            "title": spec["title"],
            "generated_by": "python -m loratool.archs.generate",
            "sources": sources,
            "hints": spec["hints"],
            "components": components,
            "fused": fused,
            "modules": modules,
        }
    return out


def dump(table: dict) -> str:
    """One module per line: small diffs when a library renames something."""
    lines = ["{"]
    items = list(table.items())
    for i, (key, value) in enumerate(items):
        comma = "," if i < len(items) - 1 else ""
        if isinstance(value, list) and value and isinstance(value[0], dict):
            body = ",\n".join("  " + json.dumps(v, separators=(",", ":")) for v in value)
            lines.append(f"{json.dumps(key)}: [\n{body}\n]{comma}")
        else:
            lines.append(f"{json.dumps(key)}: {json.dumps(value)}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main() -> None:
    TABLES.mkdir(exist_ok=True)
    for arch, table in build_tables().items():
        path = TABLES / f"{arch}.json"
        path.write_text(dump(table), encoding="utf-8")
        print(f"{path}: {len(table['modules'])} modules, {len(table['fused'])} fused weights")


if __name__ == "__main__":
    main()
