"""Anima (issue 21): Cosmos-Predict2's DiT plus Anima's LLM adapter, against diffusers at every step.

- Table: the transformer's original names, fed through diffusers' own
  `convert_cosmos_transformer_checkpoint_to_diffusers` at full size, give back exactly the diffusers
  model's keys with their rows; the transformer's and the adapter's names under `diffusion_model.`, fed
  through diffusers' Anima LoRA converter, give back the diffusers paths (`llm_adapter.` ->
  `text_conditioner.`).
- A LoRA on a tiny Cosmos transformer and a tiny `AnimaTextConditioner` (real module names, narrow
  widths), written by diffusers' own LoRA writer, is read as Anima. Our kohya (sd-scripts'
  `lora_unet_` names, mapped to ComfyUI's by ComfyUI's generic rule) and ComfyUI outputs, fed through
  diffusers' Anima LoRA converter, are the same updates; merged into the diffusers folder it equals
  PEFT's `fuse_lora` on both models; merged into the original single file (`net.` and
  `net.llm_adapter.` keys) it equals that after diffusers' single-file converter.
- OneTrainer and SimpleTuner renamings read as the same LoRA; real widths pick Anima over the DiT
  families whose diffusers names it shares (`transformer_blocks.N.ff.net.0.proj`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from deltas import deltas
from safetensors.torch import load_file, save_file
from test_archs import _rows_marker
from test_merge_diffusers import base_checkpoint

import loratool
from loratool.archs import get_architecture, kohya_flat

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from diffusers import AnimaTextConditioner, CosmosTransformer3DModel  # noqa: E402
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_anima_lora_to_diffusers  # noqa: E402
from diffusers.loaders.lora_pipeline import AnimaLoraLoaderMixin  # noqa: E402
from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers  # noqa: E402

from loratool.archs.families import anima  # noqa: E402

TINY = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=12,  # RoPE splits a head 2 x (d // 6 * 2) + rest: at least 12 wide
    num_layers=2,
    mlp_ratio=2.0,
    text_embed_dim=16,
    adaln_lora_dim=4,
    max_size=(4, 8, 8),
    patch_size=(1, 2, 2),
    extra_pos_embed_type=None,
)
TINY_ADAPTER = dict(
    source_dim=20, target_dim=16, model_dim=16, num_layers=1, num_attention_heads=2, target_vocab_size=32
)
BLOCK_TARGETS = [
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "norm1.linear_1",
    "norm3.linear_2",
]
TOP_TARGETS = ["patch_embed.proj", "time_embed.t_embedder.linear_1", "norm_out.linear_2", "proj_out"]
ADAPTER_TARGETS = ["blocks.0.self_attn.q_proj", "blocks.0.cross_attn.k_proj", "blocks.0.mlp.0", "out_proj"]
PREFIX, ADAPTER_PREFIX = "net.", "net.llm_adapter."
RTOL, ATOL = 1e-5, 1e-6


# -- the table against diffusers' converters, at full size ----------------------------------------------------------
def test_original_names_match_diffusers_single_file_converter() -> None:
    arch = get_architecture("anima")
    assert arch.components["transformer"].file_prefixes[0] == PREFIX
    assert not arch.fused and not [s for s in arch.modules.values() if s.rows or s.weight or s.transposed]
    checkpoint, expected = {}, {}
    for marker, spec in enumerate((s for s in arch.modules.values() if s.component == "transformer"), 1):
        weight = _rows_marker(marker, spec.shape[0])
        weight = weight[:, 0] if spec.type == "norm" else weight
        checkpoint[PREFIX + spec.native_weight] = expected[spec.path + ".weight"] = weight
    # What Cosmos checkpoints also hold, which the converter drops: RoPE ranges and training counters.
    checkpoint[PREFIX + "pos_embedder.dim_spatial_range"] = torch.zeros(1)
    checkpoint[PREFIX + "accum_iteration"] = torch.zeros(1)

    converted = convert_cosmos_transformer_checkpoint_to_diffusers(dict(checkpoint))
    assert set(converted) == set(expected)
    assert not [k for k, v in expected.items() if not torch.equal(converted[k], v)]
    with torch.device("meta"):
        model = CosmosTransformer3DModel(**json.loads(json.dumps(anima.ANIMA_TRANSFORMER)))
    assert set(converted) == set(model.state_dict())  # every parameter: Cosmos' Linears have no biases


def test_original_names_match_diffusers_anima_lora_converter() -> None:
    """Its LoRA converter is diffusers' only mapping of `llm_adapter.`, and a second one of the
    transformer's names (its own rename list, which has no rule for the q/k norms: Linears only)."""
    arch = get_architecture("anima")
    names = {}
    for spec in arch.modules.values():
        if spec.type == "norm" and spec.component == "transformer":
            continue
        prefix = "diffusion_model." + ("llm_adapter." if spec.component == "text_conditioner" else "")
        assert arch.comfyui_name((spec.name,)) == prefix + spec.native
        names[f"{prefix}{spec.native}.lora_A.weight"] = f"{spec.name}.lora_A.weight"
    converted = _convert_non_diffusers_anima_lora_to_diffusers(dict.fromkeys(names, torch.zeros(1)))
    assert sorted(converted) == sorted(names.values())
    with torch.device("meta"):
        models = {
            "transformer": CosmosTransformer3DModel(**json.loads(json.dumps(anima.ANIMA_TRANSFORMER))),
            "text_conditioner": AnimaTextConditioner(**anima.ANIMA_TEXT_CONDITIONER),
        }
    weights = {f"{c}.{k}" for c, m in models.items() for k in m.state_dict() if k.endswith(".weight")}
    assert {k.replace(".lora_A.weight", ".weight") for k in converted} <= weights
    assert {m.removesuffix(".weight") for m in weights} == set(arch.modules)


# -- a LoRA diffusers writes, on the tiny models ----------------------------------------------------------------------
class AnimaLoraWriter(AnimaLoraLoaderMixin):
    """diffusers' AnimaLoraLoaderMixin has no `save_lora_weights` (LoraBaseMixin's raises
    NotImplementedError): this is the one every other mixin has, over diffusers' own `_save_lora_weights`."""

    @classmethod
    def save_lora_weights(cls, save_directory, layers: dict[str, dict], metadata: dict[str, dict]) -> None:
        cls._save_lora_weights(save_directory=save_directory, lora_layers=layers, lora_metadata=metadata)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A diffusers folder (transformer and text_conditioner), its original single file, a LoRA on both
    written by diffusers (rank 4, alpha 6, proj_out rank 2) and the weights PEFT fuses with it."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("anima")
    torch.manual_seed(0)
    models = {"transformer": CosmosTransformer3DModel(**TINY), "text_conditioner": AnimaTextConditioner(**TINY_ADAPTER)}
    folder = root / "model"
    index = {"_class_name": "AnimaModularPipeline"}
    for name, model in models.items():
        model.save_pretrained(folder / name)
        index[name] = ["diffusers", type(model).__name__]
    (folder / "model_index.json").write_text(json.dumps(index))
    before = {f"{c}.{k}": v.clone() for c, m in models.items() for k, v in m.state_dict().items()}
    single = root / "anima_tiny.safetensors"
    save_file(base_checkpoint(get_architecture("anima"), models), str(single))

    targets = {
        "transformer": [f"transformer_blocks.{i}.{t}" for i in range(TINY["num_layers"]) for t in BLOCK_TARGETS]
        + TOP_TARGETS,
        "text_conditioner": ADAPTER_TARGETS,
    }
    layers, metadata = {}, {}
    for name, model in models.items():
        ranks = {"proj_out": 2} if name == "transformer" else {}
        config = LoraConfig(
            r=4, lora_alpha=6, target_modules=targets[name], init_lora_weights=False, rank_pattern=ranks
        )
        model.add_adapter(config)
        layers[name], metadata[name] = get_peft_model_state_dict(model), config.to_dict()
    AnimaLoraWriter.save_lora_weights(root / "lora", layers, metadata)
    fused = {}
    for name, model in models.items():
        model.fuse_lora()
        state = model.state_dict().items()
        fused.update({f"{name}.{k.replace('.base_layer.', '.')}": v.clone() for k, v in state if ".lora_" not in k})
    return dict(
        folder=folder,
        single=single,
        lora=root / "lora" / "pytorch_lora_weights.safetensors",
        before=before,
        fused=fused,
        targets={f"{c}.{t}" for c, ts in targets.items() for t in ts},
    )


def test_diffusers_lora_is_read_as_anima(tiny) -> None:
    keys = load_file(str(tiny["lora"]))
    assert any(k.startswith("text_conditioner.blocks.0.") for k in keys)
    report = loratool.inspect(tiny["lora"])
    assert report.format == "diffusers" and report.architecture == "anima"
    assert {m.name for m in report.modules} == tiny["targets"]
    assert not [f for f in report.findings if f.severity == "error"]


def comfyui_rule(single: Path) -> dict[str, str]:
    """ComfyUI's generic rule (comfy/lora.py): a base key `diffusion_model.X.weight` loads LoRA modules
    `lora_unet_` + X flattened and `diffusion_model.X`. ComfyUI keeps Anima's `net.` keys, adapter
    included, under `diffusion_model.`."""
    paths = [k.removeprefix(PREFIX).removesuffix(".weight") for k in load_file(str(single)) if k.endswith(".weight")]
    return {"lora_unet_" + kohya_flat(p): "diffusion_model." + p for p in paths}


def updates(converted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """module -> the update of a state dict diffusers' Anima converter returned.

    That converter only renames keys: kohya tensor names (`lora_down`/`lora_up`) and `.alpha` pass
    through as they are, and the loader behind it (`load_lora_adapter`, network_alphas=None) would load
    neither (PEFT's conversion knows `.lora.down`, not `.lora_down`) and drop the alphas. The update is
    therefore taken here, as those names mean: up @ down * alpha / rank."""
    out = {}
    for key, down in converted.items():
        if key.endswith(".lora_down.weight"):
            module = key.removesuffix(".lora_down.weight")
            up = converted[module + ".lora_up.weight"].double()
            alpha = converted.get(module + ".alpha", torch.tensor(float(down.shape[0]))).double()
            out[module] = (up @ down.double()) * alpha / down.shape[0]
    return out


def test_kohya_and_comfyui_outputs_through_diffusers_anima_converter_are_our_diffusers_file(tiny, tmp_path) -> None:
    ours = deltas(tiny["lora"])
    rule = comfyui_rule(tiny["single"])
    for to in ("kohya", "comfyui"):
        out = tmp_path / f"{to}.safetensors"
        loratool.convert(tiny["lora"], to, out)
        tensors = load_file(str(out))
        spot = {
            "kohya": ("lora_unet_blocks_0_self_attn_q_proj.", "lora_unet_llm_adapter_blocks_0_self_attn_q_proj."),
            "comfyui": ("diffusion_model.blocks.1.mlp.layer2.", "diffusion_model.llm_adapter.out_proj."),
        }[to]
        assert all(any(k.startswith(s) for k in tensors) for s in spot), sorted(tensors)[:6]
        assert loratool.inspect(out).architecture == "anima"
        if to == "kohya":  # diffusers reads only `diffusion_model.` names: ComfyUI's rule gives them
            tensors = {rule[k.split(".", 1)[0]] + "." + k.split(".", 1)[1]: v for k, v in tensors.items()}
        theirs = updates(_convert_non_diffusers_anima_lora_to_diffusers(dict(tensors)))
        assert set(theirs) == set(ours) == tiny["targets"]
        for module, value in theirs.items():
            torch.testing.assert_close(value, ours[module].double(), rtol=RTOL, atol=1e-7)
        back = tmp_path / f"{to}_back.safetensors"
        loratool.convert(out, "diffusers", back)
        got = deltas(back)
        assert set(got) == set(ours)
        for module, value in ours.items():
            torch.testing.assert_close(got[module], value, rtol=RTOL, atol=ATOL)


def test_merge_into_the_diffusers_folder_equals_fuse_lora(tiny, tmp_path) -> None:
    out = tmp_path / "merged"
    loratool.merge(tiny["folder"], [tiny["lora"]], out, device="cpu")
    got = {
        f"{c}.{k}": v
        for c in ("transformer", "text_conditioner")
        for k, v in load_file(str(out / c / "diffusion_pytorch_model.safetensors")).items()
    }
    assert set(got) == set(tiny["fused"])
    assert {k for k in got if not torch.equal(got[k], tiny["before"][k])} == {t + ".weight" for t in tiny["targets"]}
    for key, value in got.items():
        torch.testing.assert_close(value, tiny["fused"][key], rtol=RTOL, atol=ATOL)


def test_merge_into_the_original_single_file_equals_fuse_lora_after_diffusers_converter(tiny, tmp_path) -> None:
    comfy = tmp_path / "comfyui.safetensors"
    loratool.convert(tiny["lora"], "comfyui", comfy)
    for lora in (tiny["lora"], comfy):
        out = tmp_path / f"merged_{lora.stem}.safetensors"
        loratool.merge(tiny["single"], [lora], out, device="cpu")
        merged = load_file(str(out))
        # diffusers converts the DiT's keys (its Cosmos converter would rename the adapter's too, so they
        # go apart first); the adapter's original paths are its diffusers paths.
        dit = {k: v for k, v in merged.items() if not k.startswith(ADAPTER_PREFIX)}
        got = {"transformer." + k: v for k, v in convert_cosmos_transformer_checkpoint_to_diffusers(dict(dit)).items()}
        got.update({"text_conditioner." + k.removeprefix(ADAPTER_PREFIX): v for k, v in merged.items() if k not in dit})
        assert set(got) == set(tiny["fused"])
        for key, value in got.items():
            torch.testing.assert_close(
                value, tiny["fused"][key], rtol=RTOL, atol=ATOL, msg=lambda m, k=key: f"{k}: {m}"
            )


@pytest.mark.parametrize("prefix", ["lora_transformer_", "lycoris_"])
def test_onetrainer_and_simpletuner_names_read_as_the_same_lora(tiny, tmp_path, prefix: str) -> None:
    """OneTrainer (`lora_transformer_`) and SimpleTuner's LyCORIS (`lycoris_`): the transformer's diffusers
    paths with underscores, kohya tensor names (the adapter stays under sd-scripts' names)."""
    arch = get_architecture("anima")
    kohya = tmp_path / "kohya.safetensors"
    loratool.convert(tiny["lora"], "kohya", kohya)
    renamed = {}
    for key, value in load_file(str(kohya)).items():
        module, _, tensor = key.partition(".")
        (target,) = arch.kohya_index[module]
        if target.startswith("transformer."):
            module = prefix + kohya_flat(target.removeprefix("transformer."))
        renamed[f"{module}.{tensor}"] = value
    assert any(k.startswith(prefix + "transformer_blocks_0_attn1_to_q.") for k in renamed)
    path = tmp_path / "renamed.safetensors"
    save_file(renamed, str(path))
    assert loratool.inspect(path).architecture == "anima"
    want, got = deltas(tiny["lora"]), deltas(path)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "modules",
    [
        ("attn2.to_k", "norm1.linear_1"),  # names only Anima's table has
        ("ff.net.0.proj", "ff.net.2"),  # names Flux.1, SD3 and others share: the widths decide
    ],
)
def test_real_widths_are_read_as_anima(tmp_path, modules: tuple[str, str]) -> None:
    arch = get_architecture("anima")
    tensors = {}
    for part in modules:
        key = f"transformer.transformer_blocks.0.{part}"
        out_features, in_features = arch.modules[key].shape
        tensors[f"{key}.lora_A.weight"] = torch.zeros(4, in_features)
        tensors[f"{key}.lora_B.weight"] = torch.zeros(out_features, 4)
    path = tmp_path / "real.safetensors"
    save_file(tensors, str(path))
    report = loratool.inspect(path)
    assert report.architecture == "anima", report
