"""HiDream-I1 (issue 21), against diffusers at every step.

- Table: the original (single-file) names, fed through diffusers' own
  `convert_hidream_transformer_to_diffusers` at full size, give back exactly the diffusers model's
  keys with the right rows (the names are diffusers' own; the converter only strips
  `model.diffusion_model.`). The MoE routers (`ff_i.gate.weight`) are parameters, not modules: no rows.
- A LoRA saved by diffusers itself (`HiDreamImageLoraLoaderMixin.save_lora_weights`) on a tiny HiDream
  transformer (real module names, narrow widths, two routed experts) is read as HiDream. Our kohya
  (`lora_unet_`) and ComfyUI (`diffusion_model.`) outputs, fed through diffusers' HiDream LoRA converter,
  give back our diffusers output's update tensor for tensor, and loaded by diffusers they fuse to the same
  weights. Merged into the model's diffusers folder it equals diffusers' `load_lora_adapter` + `fuse_lora`;
  merged into the original single file it equals that after diffusers' single-file converter.
- Real widths: a LoRA of two HiDream modules at the true widths is read as HiDream and as nothing else.
"""

from __future__ import annotations

import pytest
import torch
from dit_oracle import assert_folder_merge_is_fuse, tiny_dit
from safetensors.torch import load_file, save_file
from test_archs import _rows_marker
from test_merge_diffusers import base_checkpoint

import loratool
from loratool.archs import detect, get_architecture

diffusers = pytest.importorskip("diffusers")
from diffusers import HiDreamImageTransformer2DModel  # noqa: E402
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_hidream_lora_to_diffusers  # noqa: E402
from diffusers.loaders.lora_pipeline import HiDreamImageLoraLoaderMixin  # noqa: E402
from diffusers.loaders.single_file_utils import convert_hidream_transformer_to_diffusers  # noqa: E402

TINY = dict(
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    caption_channels=[8, 8],
    text_emb_dim=8,
    num_routed_experts=2,
    num_activated_experts=1,
    axes_dims_rope=(4, 2, 2),
    max_resolution=(8, 8),
    llama_layers=[0, 1, 2, 3],
)
DOUBLE_TARGETS = [
    "adaLN_modulation.1",
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out",
    "attn1.to_q_t",
    "attn1.to_v_t",
    "attn1.to_out_t",
    "ff_i.shared_experts.w1",
    "ff_i.shared_experts.w2",
    "ff_i.experts.0.w1",
    "ff_i.experts.1.w2",
    "ff_i.experts.1.w3",
    "ff_t.w1",
    "ff_t.w2",
]
SINGLE_TARGETS = [
    "adaLN_modulation.1",
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_out",
    "ff_i.shared_experts.w3",
    "ff_i.experts.0.w2",
]
TOP_TARGETS = [
    "x_embedder.proj",
    "t_embedder.timestep_embedder.linear_1",
    "p_embedder.pooled_embedder.linear_2",
    "caption_projection.0.linear",
    "caption_projection.4.linear",  # T5's projection: after one per block
    "final_layer.linear",
    "final_layer.adaLN_modulation.1",
]
PREFIX = "model.diffusion_model."
# dit_oracle gives `proj_out` rank 2; HiDream has no `proj_out` (its output layer is `final_layer.linear`).
pytestmark = pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match:RuntimeWarning")


def test_original_names_and_rows_match_diffusers_converter() -> None:
    arch = get_architecture("hidream")
    specs = [s for s in arch.modules.values() if s.component == "transformer"]
    assert not arch.fused and not [s for s in specs if s.rows or s.fused]
    assert all(s.native == s.path for s in specs)  # published in diffusers' layout
    checkpoint, expected = {}, {}
    for marker, spec in enumerate(specs, 1):
        weight = _rows_marker(marker, spec.shape[0])
        if spec.type == "norm":
            weight = weight[:, 0]
        checkpoint[PREFIX + spec.native_weight] = expected[spec.path + ".weight"] = weight
    config = get_architecture_config()
    blocks = [f"double_stream_blocks.{i}" for i in range(config["num_layers"])]
    blocks += [f"single_stream_blocks.{i}" for i in range(config["num_single_layers"])]
    for block in blocks:  # the MoE router: a parameter, not a module, so no row
        checkpoint[f"{PREFIX}{block}.block.ff_i.gate.weight"] = torch.zeros(config["num_routed_experts"], 1)
    norms = [s for s in specs if s.type == "norm"]
    assert len(norms) == config["num_layers"] * 4 + config["num_single_layers"] * 2  # q/k RMSNorms per stream

    converted = convert_hidream_transformer_to_diffusers(dict(checkpoint))
    weights = {k: v for k, v in converted.items() if k.endswith(".weight")}
    with torch.device("meta"):
        model = HiDreamImageTransformer2DModel(**config)
    assert set(weights) == {k for k in model.state_dict() if k.endswith(".weight")}
    assert set(expected) == {k for k in weights if not k.endswith(".ff_i.gate.weight")}
    assert not [k for k, v in expected.items() if not torch.equal(weights[k], v)]
    rows = {k: v.shape[0] for k, v in model.state_dict().items() if k.endswith(".weight")}
    assert not [k for k in expected if rows[k] != expected[k].shape[0]]


def get_architecture_config() -> dict:
    from loratool.archs.families import hidream

    return dict(hidream.HIDREAM_I1)


# -- a LoRA diffusers saved, on a tiny HiDream transformer -------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """The tiny model as a diffusers folder and as original single files (ComfyUI's split file without
    a prefix, and under `model.diffusion_model.`); a diffusers-saved LoRA; diffusers' fused weights."""
    root = tmp_path_factory.mktemp("hidream")
    torch.manual_seed(0)
    model = HiDreamImageTransformer2DModel(**TINY)
    checkpoint = base_checkpoint(get_architecture("hidream"), {"transformer": model})
    missing = {k: v for k, v in model.state_dict().items() if k not in checkpoint}
    assert set(missing) and all(k.endswith(".ff_i.gate.weight") for k in missing)  # the routers: no rows
    checkpoint.update({k: v.detach().clone() for k, v in missing.items()})
    singles = {}
    for name, prefix in (("plain", ""), ("prefixed", PREFIX)):
        singles[name] = root / f"hidream_tiny_{name}.safetensors"
        save_file({prefix + k: v.contiguous() for k, v in checkpoint.items()}, str(singles[name]))
    targets = [
        f"{kind}_stream_blocks.{i}.block.{t}"
        for kind, names in (("double", DOUBLE_TARGETS), ("single", SINGLE_TARGETS))
        for i in range(2)
        for t in names
    ] + TOP_TARGETS
    dit = tiny_dit(root, model, "HiDreamImagePipeline", HiDreamImageLoraLoaderMixin, targets)
    return dict(folder=dit.folder, singles=singles, lora=dit.lora, before=dit.before, fused=dit.fused, targets=targets)


def updates(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """module -> B @ A of a diffusers-named LoRA state dict (`transformer.` keys)."""
    out = {}
    for key, down in state.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            out[module.removeprefix("transformer.")] = state[module + ".lora_B.weight"].double() @ down.double()
    return out


def for_diffusers(tensors: dict[str, torch.Tensor], base_keys: set[str]) -> dict[str, torch.Tensor]:
    """What diffusers' HiDream LoRA loader can read, from our kohya or ComfyUI file.

    Quirks of `_convert_non_diffusers_hidream_lora_to_diffusers` worked around here: it only swaps
    `diffusion_model.` for `transformer.` (it reads the PEFT-named files diffusion-pipe and ai-toolkit
    write), so (1) kohya's `lora_unet_` names are not read at all: they are mapped here the way ComfyUI
    does, from the base model's own keys with dots as underscores; (2) `lora_down`/`lora_up` and `.alpha`
    are not understood (diffusers fails to find a rank): they become `lora_A`/`lora_B`, with alpha / rank
    folded into `lora_A`."""
    flat = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_"): k.removesuffix(".weight") for k in base_keys}
    out = {}
    for key, value in tensors.items():
        if key.endswith(".alpha"):
            continue
        stem, side = key.rsplit(".lora_", 1)
        name = "diffusion_model." + flat[stem] if stem.startswith("lora_unet_") else stem
        if side == "down.weight":
            alpha = tensors.get(stem + ".alpha")
            out[name + ".lora_A.weight"] = value * (1.0 if alpha is None else alpha.item() / value.shape[0])
        else:
            assert side == "up.weight", key
            out[name + ".lora_B.weight"] = value
    return out


def test_diffusers_lora_is_read_as_hidream(tiny) -> None:
    report = loratool.inspect(tiny["lora"])
    assert report.format == "diffusers" and report.architecture == "hidream"
    assert {m.name.removeprefix("transformer.") for m in report.modules} == set(tiny["targets"])
    assert not [f for f in report.findings if f.severity == "error"]


def test_trainer_layouts_through_diffusers_hidream_converter_are_our_diffusers_file(tiny, tmp_path) -> None:
    from deltas import deltas

    ours = deltas(tiny["lora"])  # the scaled updates, by canonical module
    for to in ("kohya", "comfyui"):
        out = tmp_path / f"{to}.safetensors"
        loratool.convert(tiny["lora"], to, out)
        tensors = load_file(str(out))
        prefix = {
            "kohya": "lora_unet_double_stream_blocks_0_block_attn1_to_q.",
            "comfyui": "diffusion_model.double_stream_blocks.0.block.",
        }
        assert any(k.startswith(prefix[to]) for k in tensors), sorted(tensors)[:4]
        assert loratool.inspect(out).architecture == "hidream"
        readable = for_diffusers(tensors, set(tiny["before"]))
        converted = _convert_non_diffusers_hidream_lora_to_diffusers(dict(readable))
        theirs = updates(converted)
        assert set(theirs) == {k.removeprefix("transformer.") for k in ours}
        for module, value in theirs.items():
            torch.testing.assert_close(value, ours["transformer." + module].double(), rtol=1e-5, atol=1e-7)
        # and diffusers' own loader (`lora_state_dict` applies the converter) fuses it to the same weights
        model = HiDreamImageTransformer2DModel(**TINY)
        model.load_state_dict(tiny["before"])
        model.load_lora_adapter(HiDreamImageLoraLoaderMixin.lora_state_dict(readable), prefix="transformer")
        model.fuse_lora()
        got = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
        for key, value in tiny["fused"].items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)


def test_merge_into_the_diffusers_folder_equals_fuse_lora(tiny, tmp_path) -> None:
    assert_folder_merge_is_fuse(
        tiny["folder"], tiny["lora"], tiny["before"], tiny["fused"], tiny["targets"], tmp_path / "merged"
    )


@pytest.mark.parametrize("single", ["plain", "prefixed"])
def test_merge_into_the_single_file_equals_fuse_lora_after_diffusers_converter(tiny, tmp_path, single: str) -> None:
    comfy = tmp_path / "comfyui.safetensors"
    loratool.convert(tiny["lora"], "comfyui", comfy)
    for lora in (tiny["lora"], comfy):
        out = tmp_path / f"merged_{lora.stem}.safetensors"
        loratool.merge(tiny["singles"][single], [lora], out, device="cpu")
        merged = load_file(str(out))
        assert all(k.startswith(PREFIX) for k in merged) == (single == "prefixed")
        converted = convert_hidream_transformer_to_diffusers(dict(merged))
        assert set(converted) == set(tiny["fused"])
        for key, value in tiny["fused"].items():
            torch.testing.assert_close(converted[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("prefix", ["lora_transformer_", "lycoris_"])
def test_onetrainer_and_simpletuner_names_read_as_the_same_lora(tiny, tmp_path, prefix: str) -> None:
    """OneTrainer (`lora_transformer_`) and SimpleTuner's LyCORIS (`lycoris_`, which ComfyUI maps for
    HiDream): the diffusers path with underscores, kohya tensor names."""
    from deltas import deltas

    kohya = tmp_path / "kohya.safetensors"
    loratool.convert(tiny["lora"], "kohya", kohya)
    renamed = {prefix + k.removeprefix("lora_unet_"): v for k, v in load_file(str(kohya)).items()}
    path = tmp_path / "renamed.safetensors"
    save_file(renamed, str(path))
    assert loratool.inspect(path).architecture == "hidream"
    want, got = deltas(tiny["lora"]), deltas(path)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=0)


def test_real_widths_are_read_as_hidream_only(tmp_path) -> None:
    """Width 2560 (20 heads of 128) and the routed experts' 6912 rows: HiDream's, no other family's."""
    shapes = {
        "double_stream_blocks.0.block.attn1.to_q": (2560, 2560),
        "single_stream_blocks.3.block.ff_i.experts.2.w1": (6912, 2560),
    }
    tensors = {}
    for module, (rows, cols) in shapes.items():
        tensors[f"transformer.{module}.lora_A.weight"] = torch.zeros(4, cols)
        tensors[f"transformer.{module}.lora_B.weight"] = torch.zeros(rows, 4)
    path = tmp_path / "real.safetensors"
    save_file(tensors, str(path))
    report = loratool.inspect(path)
    assert report.architecture == "hidream"
    assert not [f for f in report.findings if f.severity == "error"]
    arch = get_architecture("hidream")
    assert {m: tuple(arch.modules["transformer." + m].shape) for m in shapes} == shapes
    found = detect(["transformer." + m for m in shapes], "diffusers", {})
    assert found.arch.name == "hidream" and not found.tied
    assert [name for name, count in found.scores if count] == ["hidream"]  # no other table has these names
