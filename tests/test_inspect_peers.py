"""inspect on files the real libraries write during the test, checked against those libraries' own numbers.

diffusers saves a pipeline's LoRA with `save_lora_weights`; the PEFT layers it trained hold the truth
for every module: `r`, and `scaling` (alpha / r, or alpha / sqrt(r) with rsLoRA).
"""

from __future__ import annotations

import pytest
import torch

import loratool

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from tiny_models import clip_config, flux_transformer, sdxl_unet  # noqa: E402
from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402


def peft_truth(model: torch.nn.Module, component: str) -> dict[str, tuple[int, float]]:
    """module path as diffusers saves it -> (rank, scaling) from PEFT's own layers."""
    return {
        f"{component}.{name}": (layer.r["default"], layer.scaling["default"])
        for name, layer in model.named_modules()
        if isinstance(layer, LoraLayer)
    }


def randomize_lora(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.05)


def check(report: loratool.InspectReport, truth: dict[str, tuple[int, float]], expected_findings=()) -> None:
    modules = {m.name: m for m in report.modules}
    assert set(modules) == set(truth)
    for name, (rank, scaling) in truth.items():
        assert modules[name].rank == rank, name
        assert modules[name].scale == pytest.approx(scaling, rel=1e-6), name
        assert modules[name].targets, name
    found = [(f.code, f.module) for f in report.findings if f.severity != "info"]
    assert found == list(expected_findings)


def test_sdxl_pipeline_lora_saved_by_diffusers(tmp_path):
    torch.manual_seed(0)
    unet, te1, te2 = sdxl_unet(), CLIPTextModel(clip_config()), CLIPTextModelWithProjection(clip_config())
    unet_cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"],
        rank_pattern={"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": 2},
        alpha_pattern={"^down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_v": 3},
        init_lora_weights=False,
    )
    te_cfg = LoraConfig(
        r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "fc1"], init_lora_weights=False
    )
    unet.add_adapter(unet_cfg)
    te1.add_adapter(te_cfg)
    te2.add_adapter(te_cfg)
    for model in (unet, te1, te2):
        randomize_lora(model)
    StableDiffusionXLLoraLoaderMixin.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(te1),
        text_encoder_2_lora_layers=get_peft_model_state_dict(te2),
        unet_lora_adapter_metadata=unet_cfg.to_dict(),
        text_encoder_lora_adapter_metadata=te_cfg.to_dict(),
        text_encoder_2_lora_adapter_metadata=te_cfg.to_dict(),
    )
    report = loratool.inspect(tmp_path / "pytorch_lora_weights.safetensors")
    assert report.format == "diffusers"
    assert report.architecture == "sdxl"
    assert report.summary["rslora"] is True
    truth = {**peft_truth(unet, "unet"), **peft_truth(te1, "text_encoder"), **peft_truth(te2, "text_encoder_2")}
    check(report, truth)
    assert {m.component for m in report.modules} == {"unet", "te1", "te2"}


def test_flux_lora_saved_by_diffusers(tmp_path):
    torch.manual_seed(0)
    flux = flux_transformer()
    cfg = LoraConfig(
        r=8,
        lora_alpha=4,
        target_modules=["to_q", "to_k", "to_v", "proj_mlp", "proj_out", "norm.linear"],
        alpha_pattern={"single_transformer_blocks.1.proj_mlp": 16},
        init_lora_weights=False,
    )
    flux.add_adapter(cfg)
    randomize_lora(flux)
    FluxLoraLoaderMixin.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(flux),
        transformer_lora_adapter_metadata=cfg.to_dict(),
    )
    report = loratool.inspect(tmp_path / "pytorch_lora_weights.safetensors")
    assert (report.format, report.architecture) == ("diffusers", "flux1")
    # The tiny model's final proj_out is 4 x 32: rank 8 exceeds min(out, in), so half of it is wasted.
    check(report, peft_truth(flux, "transformer"), [("rank-deficient", "transformer.proj_out")])
    assert {m.name: m.numerical_rank for m in report.modules}["transformer.proj_out"] == 4
