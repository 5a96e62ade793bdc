"""`inspect --base` on narrow single-file checkpoints with the real layouts (LDM/sgm, OpenCLIP, BFL).

The bases are built from the tiny reference models, keyed the way single-file checkpoints key them
(the table's native names, verified against diffusers' converters in test_archs.py), with fused
weights stacked as the originals stack them: OpenCLIP q/k/v in one `in_proj_weight`, Flux q/k/v in
`qkv` and q/k/v/mlp in `linear1`. Shapes come from the base, never from the full-size tables.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import clip_config, clip_text_model, flux_transformer, sd15_unet, sdxl_unet, single_file
from transformers import CLIPTextModelWithProjection

import loratool
from loratool.archs import get_architecture

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def bases(tmp_path: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    built = {
        "sd1": single_file(get_architecture("sd1"), {"unet": sd15_unet(), "text_encoder": clip_text_model()}),
        "sdxl": single_file(
            get_architecture("sdxl"),
            {
                "unet": sdxl_unet(),
                "text_encoder": clip_text_model(),
                "text_encoder_2": CLIPTextModelWithProjection(clip_config()),
            },
        ),
        "flux1": single_file(get_architecture("flux1"), {"transformer": flux_transformer()}),
    }
    paths = {}
    for name, sd in built.items():
        paths[name] = tmp_path / f"{name}_base.safetensors"
        save_file(sd, paths[name])
    return paths


@pytest.fixture(scope="module")
def base_files(tmp_path_factory) -> dict[str, Path]:
    return bases(tmp_path_factory.mktemp("bases"))


@pytest.mark.parametrize(
    ("fixture", "arch"),
    [
        ("kohya_sd15.safetensors", "sd1"),
        ("kohya_sdxl.safetensors", "sdxl"),
        ("kohya_flux.safetensors", "flux1"),  # fused qkv / linear1 modules on fused base weights
        ("flux_diffusers.safetensors", "flux1"),  # split to_q/to_k/to_v modules on fused base weights
        ("flux_comfyui.safetensors", "flux1"),
        ("flux_xlabs.safetensors", "flux1"),
    ],
)
def test_lora_fits_its_narrow_single_file_base(base_files, fixture, arch):
    report = loratool.inspect(FIXTURES / fixture, base=base_files[arch])
    # The Flux base holds only the transformer: CLIP-L modules have nowhere to go and must say so.
    te_modules = {m.name for m in report.modules if m.component in ("te1",)} if arch == "flux1" else set()
    problems = [(f.code, f.module) for f in report.findings if f.severity != "info"]
    assert problems == [
        ("unknown-key", name) for name in sorted(te_modules, key=[m.name for m in report.modules].index)
    ]
    assert all(f.severity == "error" for f in report.findings if f.code == "unknown-key")
    located = [m for m in report.modules if m.name not in te_modules]
    assert located and report.summary["targeted_base_parameters"] == sum(m.shape[0] * _cols(m.shape) for m in located)


def _cols(shape: list[int]) -> int:
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def test_split_qkv_rows_land_in_the_fused_openclip_weight(tmp_path, base_files):
    """A te2 k_proj update overflowing fp16 is reported on k_proj alone: its rows are [d:2d] of in_proj_weight."""
    sd = {k: v.to(torch.float16) for k, v in loratool_load(base_files["sdxl"]).items()}
    key = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    d = sd[key].shape[1]
    sd[key][d : 2 * d] = 65000.0  # only the k rows are near the fp16 limit (reads 64992)
    base = tmp_path / "sdxl_fp16.safetensors"
    save_file(sd, base)
    lora = tmp_path / "te2.safetensors"
    modules = {}
    for part in ("q_proj", "k_proj", "v_proj"):
        name = f"lora_te2_text_model_encoder_layers_0_self_attn_{part}"
        modules[f"{name}.lora_down.weight"] = torch.full((2, d), 0.5, dtype=torch.float16)
        modules[f"{name}.lora_up.weight"] = torch.full((d, 2), 1000.0, dtype=torch.float16)  # dW = 1000
        modules[f"{name}.alpha"] = torch.tensor(2.0, dtype=torch.float16)
    save_file(modules, lora, {"ss_base_model_version": "sdxl_base_v1-0"})
    report = loratool.inspect(lora, base=base)
    overflow = [(f.module, f.severity) for f in report.findings if f.code == "fp16-overflow"]
    assert overflow == [("lora_te2_text_model_encoder_layers_0_self_attn_k_proj", "error")]


def test_wrong_width_base_is_a_shape_mismatch(tmp_path, base_files):
    sd = loratool_load(base_files["sd1"])
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    sd[key] = torch.zeros(sd[key].shape[0] * 2, sd[key].shape[1])
    base = tmp_path / "wrong.safetensors"
    save_file(sd, base)
    report = loratool.inspect(FIXTURES / "kohya_sd15.safetensors", base=base)
    problems = [(f.code, f.module) for f in report.findings if f.severity == "error"]
    assert problems == [("shape-mismatch", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q")]


def loratool_load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return dict(load_file(path))


def test_fused_weight_with_rows_that_do_not_add_up_is_a_shape_mismatch(tmp_path):
    """A qkv of 4 x width rows cannot be q/k/v blocks of width rows each (a merge refuses it too)."""
    base = tmp_path / "odd_qkv.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(128, 32)}, base)
    report = loratool.inspect(FIXTURES / "kohya_flux.safetensors", base=base)
    codes = {f.code for f in report.findings if f.module == "lora_unet_double_blocks_0_img_attn_qkv"}
    assert "shape-mismatch" in codes


@pytest.mark.parametrize(
    ("fixture", "base", "mismatch"),
    [
        ("kohya_sdxl.safetensors", "sd1", "Stable Diffusion XL"),
        ("kohya_sd15.safetensors", "sdxl", "Stable Diffusion 1"),
        ("kohya_flux.safetensors", "sdxl", "Flux.1"),
        ("kohya_sd15.safetensors", "sd1", None),
        ("kohya_sdxl.safetensors", "sdxl", None),
    ],
)
def test_a_base_of_another_model_is_named_as_the_cause(base_files, fixture, base, mismatch):
    report = loratool.inspect(FIXTURES / fixture, base=base_files[base])
    found = [f for f in report.findings if f.code == "base-mismatch"]
    if mismatch is None:
        assert found == []
        return
    assert len(found) == 1 and found[0].severity == "error"
    assert found[0].message.startswith(f"this LoRA is for {mismatch}")
    assert report.findings[0].code == "base-mismatch"  # the cause comes before its consequences
