"""Stable Diffusion 3 / 3.5 (issue 21), against diffusers at every step.

- Tables: each variant's original (single-file) names, fed through diffusers' own
  `convert_sd3_transformer_checkpoint_to_diffusers` at full size, give back exactly the diffusers
  model's keys, with the fused qkv rows and the swapped (shift, scale) halves where they belong.
- A LoRA saved by diffusers itself (`SD3LoraLoaderMixin.save_lora_weights`) on a tiny SD3.5-Medium-shaped
  transformer (real module names, narrow widths, `attn2` in block 0, q/k RMSNorms) is read as
  SD3.5 Medium; converted to kohya and ComfyUI names and back it is the same update; merged into the
  model's diffusers folder it equals diffusers' `load_lora_adapter` + `fuse_lora`; merged into the
  original single file it equals that after diffusers' single-file converter.
- Real widths decide between the variants when the names cannot (SD3.5 Large vs Medium).
"""

from __future__ import annotations

import json

import pytest
import torch
from dit_oracle import assert_folder_merge_is_fuse, tiny_dit
from safetensors.torch import load_file, save_file
from test_archs import _rows_marker
from test_merge_diffusers import base_checkpoint

import loratool
from loratool.archs import get_architecture

diffusers = pytest.importorskip("diffusers")
from diffusers import SD3Transformer2DModel  # noqa: E402
from diffusers.loaders.lora_pipeline import SD3LoraLoaderMixin  # noqa: E402
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers  # noqa: E402

VARIANTS = ("sd3", "sd3.5-medium", "sd3.5-large")
TINY = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    caption_projection_dim=16,
    pooled_projection_dim=32,
    pos_embed_max_size=8,
    dual_attention_layers=(0,),
    qk_norm="rms_norm",
)
LORA_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_out.0",
    "attn2.to_q",
    "attn2.to_v",
    "ff.net.0.proj",
    "ff_context.net.2",
    "norm1.linear",
    "norm1_context.linear",
    "norm_out.linear",
    "proj_out",
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_original_names_fused_rows_and_swaps_match_diffusers_converter(variant: str) -> None:
    arch = get_architecture(variant)
    prefix = "model.diffusion_model."
    checkpoint, expected = {}, {}
    specs = [s for s in arch.modules.values() if s.component == "transformer"]
    for marker, spec in enumerate(specs, 1):
        if spec.fused is not None:
            continue
        rows = spec.shape[0]
        if spec.type == "norm":
            checkpoint[prefix + spec.native_weight] = expected[spec.path + ".weight"] = _rows_marker(marker, rows)[:, 0]
            continue
        weight = _rows_marker(marker, rows)
        checkpoint[prefix + spec.native_weight] = weight
        checkpoint[prefix + spec.native + ".bias"] = weight[:, 0].clone()
        half = rows // 2
        expected[spec.path + ".weight"] = torch.cat([weight[half:], weight[:half]]) if spec.rows else weight
    for marker, group in enumerate((g for g in arch.fused.values() if g.component == "transformer"), 10_000):
        parts = [arch.modules[p] for p in group.parts]
        fused = _rows_marker(marker, sum(p.shape[0] for p in parts))
        checkpoint[prefix + group.weight] = fused
        checkpoint[prefix + group.weight.removesuffix("weight") + "bias"] = fused[:, 0].clone()
        start = 0
        for spec in parts:
            expected[spec.path + ".weight"] = fused[start : start + spec.shape[0]]
            start += spec.shape[0]
    width = arch.modules["transformer.context_embedder"].shape[0]
    checkpoint[prefix + "pos_embed"] = torch.zeros(1, 4, width)  # a parameter, not a module: no row
    swapped = {s.path for s in specs if s.rows == "swap_halves"}
    last = len({s.path.split(".")[1] for s in specs if s.path.startswith("transformer_blocks.")}) - 1
    assert swapped == {"norm_out.linear", f"transformer_blocks.{last}.norm1_context.linear"}

    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(checkpoint))
    weights = {k: v for k, v in converted.items() if k.endswith(".weight")}
    assert set(weights) == set(expected)
    assert not [k for k, v in expected.items() if not torch.equal(weights[k], v)]
    with torch.device("meta"):
        model = SD3Transformer2DModel(**json.loads(json.dumps(_config_of(variant))))
    assert set(weights) == {k for k in model.state_dict() if k.endswith(".weight")}


def _config_of(variant: str) -> dict:
    from loratool.archs.families import sd3

    return {"sd3": sd3.SD3_MEDIUM, "sd3.5-medium": sd3.SD35_MEDIUM, "sd3.5-large": sd3.SD35_LARGE}[variant]


# -- a LoRA diffusers saved, on a tiny SD3.5-Medium-shaped transformer -------------------------------------------
def tiny_transformer() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(**TINY)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """The tiny model as a diffusers folder and as an original single file; a diffusers-saved LoRA; and
    diffusers' fused weights with it."""
    root = tmp_path_factory.mktemp("sd3")
    model = tiny_transformer()
    single = root / "sd35m_tiny.safetensors"
    checkpoint = base_checkpoint(get_architecture("sd3.5-medium"), {"transformer": model})
    checkpoint["model.diffusion_model.pos_embed"] = model.pos_embed.pos_embed.clone()  # a buffer, not a module
    # The tiny model's last block is block 2; an original file swaps its text modulation's halves there
    # (the full-size table knows that block as 23).
    stem = f"model.diffusion_model.joint_blocks.{TINY['num_layers'] - 1}.context_block.adaLN_modulation.1."
    for suffix in ("weight", "bias"):
        half = checkpoint[stem + suffix].shape[0] // 2
        checkpoint[stem + suffix] = torch.cat([checkpoint[stem + suffix][half:], checkpoint[stem + suffix][:half]])
    save_file(checkpoint, str(single))
    # Every block but the last (whose text stream the full-size table knows as block 23 or 37, where
    # the original file swaps its modulation halves); attn2 where the tiny model has it (block 0).
    last = TINY["num_layers"] - 1
    targets = [
        f"transformer_blocks.{i}.{t}"
        for i in range(last)
        for t in LORA_TARGETS
        if t not in ("norm_out.linear", "proj_out") and (not t.startswith("attn2.") or i == 0)
    ]
    targets += ["norm_out.linear", "proj_out"]
    dit = tiny_dit(root, model, "StableDiffusion3Pipeline", SD3LoraLoaderMixin, targets)
    return dict(folder=dit.folder, single=single, lora=dit.lora, before=dit.before, fused=dit.fused, targets=targets)


def test_diffusers_lora_is_read_as_sd35_medium(tiny) -> None:
    report = loratool.inspect(tiny["lora"])
    assert report.format == "diffusers" and report.architecture == "sd3.5-medium"
    assert len(report.modules) == len(tiny["targets"])
    assert not [f for f in report.findings if f.severity == "error"]


def test_kohya_and_comfyui_outputs_are_the_same_update(tiny, tmp_path) -> None:
    from deltas import deltas

    want = deltas(tiny["lora"])
    for to in ("kohya", "comfyui"):
        out = tmp_path / f"{to}.safetensors"
        loratool.convert(tiny["lora"], to, out, arch="sd3.5-medium")
        keys = load_file(str(out))
        if to == "kohya":
            assert any(k.startswith("lora_unet_joint_blocks_0_x_block_attn_qkv.") for k in keys)
        else:
            assert any(k.startswith("diffusion_model.joint_blocks.0.context_block.attn.qkv.") for k in keys)
        back = tmp_path / f"{to}_back.safetensors"
        loratool.convert(out, "diffusers", back, arch="sd3.5-medium")
        for got in (deltas(out), deltas(back)):
            # attn2's qkv is written whole: its absent k rows are zeros, an update of nothing
            assert set(want) <= set(got) and all(not got[k].any() for k in set(got) - set(want))
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_merge_into_the_diffusers_folder_equals_fuse_lora(tiny, tmp_path) -> None:
    assert_folder_merge_is_fuse(
        tiny["folder"], tiny["lora"], tiny["before"], tiny["fused"], tiny["targets"], tmp_path / "merged"
    )


def test_merge_into_the_original_single_file_equals_fuse_lora_after_diffusers_converter(tiny, tmp_path) -> None:
    for source in ("diffusers", "comfyui"):
        lora = tiny["lora"]
        if source == "comfyui":
            lora = tmp_path / "comfyui.safetensors"
            loratool.convert(tiny["lora"], "comfyui", lora, arch="sd3.5-medium")
        out = tmp_path / f"merged_{source}.safetensors"
        loratool.merge(tiny["single"], [lora], out, device="cpu")
        converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(load_file(str(out))))
        for key, value in tiny["fused"].items():
            if key in converted:
                torch.testing.assert_close(
                    converted[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}"
                )
        assert {t + ".weight" for t in tiny["targets"]} <= set(converted)


def test_real_widths_pick_the_variant_the_names_cannot(tmp_path) -> None:
    """Blocks 0-23 without attn2 are in all three tables; a factor of width 2432 is SD3.5 Large's."""
    for width, want in ((2432, "sd3.5-large"), (1536, "sd3")):
        tensors = {}
        for i in range(2):
            for part in ("to_q", "to_out.0"):
                key = f"transformer.transformer_blocks.{i}.attn.{part}"
                tensors[f"{key}.lora_A.weight"] = torch.zeros(4, width)
                tensors[f"{key}.lora_B.weight"] = torch.zeros(width, 4)
        path = tmp_path / f"w{width}.safetensors"
        save_file(tensors, str(path))
        assert loratool.inspect(path).architecture == want
