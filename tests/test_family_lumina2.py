"""Lumina-Image 2.0 (issue 21), against diffusers at every step.

- The table's original (single-file) names, fed through diffusers' own `convert_lumina2_to_diffusers`
  at full size, give back exactly the diffusers model's keys, with the fused grouped-query `qkv` split
  into unequal row blocks (q 2304, k 768, v 768).
- A LoRA saved by diffusers itself (`Lumina2LoraLoaderMixin.save_lora_weights`) on a tiny Lumina 2
  transformer (real module names, narrow widths, the same 3:1 ratio of query to key/value heads) is
  read as Lumina 2; our kohya and ComfyUI outputs, fed through diffusers' Lumina 2 LoRA converter, are
  the same update; merged into the diffusers folder it equals diffusers' `fuse_lora`, merged into the
  original single file it equals that after diffusers' single-file converter.
- OneTrainer and SimpleTuner LyCORIS names read as the same LoRA; real widths are read as Lumina 2.

Quirks of diffusers' converters worked around here:
- the single-file converter fails on the `model.diffusion_model.` keys it means to accept (it renames
  them, then pops the old names): it is given bare names;
- both split the fused qkv at the full model's fixed rows (`torch.split(..., [2304, 768, 768])`): for
  the tiny model the split is scaled to its own widths (same 3:1:1 proportions), nothing else changes;
- the LoRA converter reads only `diffusion_model.` + original names with PEFT's `lora_A`/`lora_B`, no
  alpha (any other key is an error), and only block modules (qkv, out, w1-w3, adaLN_modulation.1, all of
  them in every block): our files are given to it with alpha / rank folded into lora_B, kohya names
  turned into original names, and the modules outside the blocks left out.
"""

from __future__ import annotations

import json

import pytest
import torch
from dit_oracle import assert_folder_merge_is_fuse, assert_single_file_merge_is_fuse, tiny_dit
from safetensors.torch import load_file, save_file
from test_archs import _rows_marker
from test_merge_diffusers import base_checkpoint

import loratool
from loratool.archs import get_architecture, kohya_flat

diffusers = pytest.importorskip("diffusers")
from diffusers import Lumina2Transformer2DModel  # noqa: E402
from diffusers.loaders import lora_conversion_utils, single_file_utils  # noqa: E402
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lumina2_lora_to_diffusers  # noqa: E402
from diffusers.loaders.lora_pipeline import Lumina2LoraLoaderMixin  # noqa: E402
from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers  # noqa: E402

# Narrow, but with the published model's structure: 3 query heads to 1 key/value head (24:8), two
# refiners of each kind (diffusers' single-file converter names context_refiner.0/.1 explicitly).
TINY = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    hidden_size=24,
    num_layers=2,
    num_refiner_layers=2,
    num_attention_heads=3,
    num_kv_heads=1,
    multiple_of=16,
    axes_dim_rope=(2, 2, 4),
    axes_lens=(16, 8, 8),
    cap_feat_dim=16,
)
ATTN_FF = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "feed_forward.linear_1",
    "feed_forward.linear_2",
    "feed_forward.linear_3",
]
TOP_TARGETS = [
    "x_embedder",
    "time_caption_embed.timestep_embedder.linear_1",
    "time_caption_embed.caption_embedder.1",
    "norm_out.linear_1",
    "norm_out.linear_2",
]
BLOCKS = ("layers.", "noise_refiner.", "context_refiner.")
PREFIX = "model.diffusion_model."  # ComfyUI's repackaged checkpoint


class _TinyQKVSplit:
    """Stands in for `torch` inside diffusers' converters: their fused-qkv split at the full model's
    fixed rows (2304, 768, 768) becomes the same 3:1:1 split of the tiny model's rows."""

    def __init__(self, torch_module) -> None:
        self._torch = torch_module

    def __getattr__(self, name: str):
        return getattr(self._torch, name)

    def split(self, tensor, sizes, dim=0):
        if list(sizes) == [2304, 768, 768] and tensor.shape[dim] != 3840:
            unit = tensor.shape[dim] // 5
            sizes = [3 * unit, unit, unit]
        return self._torch.split(tensor, sizes, dim=dim)


def bare(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' single-file converter strips ComfyUI's `model.diffusion_model.` itself, but then looks
    the keys up under their old names (a KeyError): it is given the bare names."""
    return {k.removeprefix(PREFIX): v for k, v in checkpoint.items()}


@pytest.fixture
def tiny_split(monkeypatch) -> None:
    for module in (single_file_utils, lora_conversion_utils):
        monkeypatch.setattr(module, "torch", _TinyQKVSplit(torch))


# -- the table against diffusers' single-file converter, at full size ---------------------------------------------
def test_original_names_and_unequal_qkv_rows_match_diffusers_converter() -> None:
    from loratool.archs.families.lumina2 import LUMINA2

    arch = get_architecture("lumina2")
    with torch.device("meta"):
        model = Lumina2Transformer2DModel(**json.loads(json.dumps(LUMINA2)))
    keys = set(model.state_dict())
    specs = [s for s in arch.modules.values() if s.component == "transformer"]
    assert not [s for s in specs if s.rows or s.weight]  # no swapped halves, every norm keeps `.weight`
    checkpoint, expected = {}, {}
    for marker, spec in enumerate(specs, 1):
        if spec.fused is not None:
            continue
        weight = _rows_marker(marker, spec.shape[0])
        if spec.type == "norm":
            weight = weight[:, 0]
        checkpoint[PREFIX + spec.native_weight] = expected[spec.path + ".weight"] = weight
        if spec.path + ".bias" in keys:
            checkpoint[PREFIX + spec.native + ".bias"] = expected[spec.path + ".bias"] = weight[:, 0].clone()
    groups = [g for g in arch.fused.values() if g.component == "transformer"]
    assert len(groups) == 30  # 26 layers + 2 noise + 2 context refiners, one qkv each
    for marker, group in enumerate(groups, 10_000):
        parts = [arch.modules[p] for p in group.parts]
        rows = group.row_sizes(parts[0].shape[1], sum(p.shape[0] for p in parts))
        assert rows == [p.shape[0] for p in parts] == [2304, 768, 768]
        fused = _rows_marker(marker, sum(rows))
        checkpoint[PREFIX + group.weight] = fused
        for spec, block in zip(parts, torch.split(fused, rows), strict=True):
            expected[spec.path + ".weight"] = block
    checkpoint[PREFIX + "norm_final.weight"] = torch.zeros(2304)  # the unused norm the converter drops

    converted = convert_lumina2_to_diffusers(bare(checkpoint))
    assert set(converted) == set(expected) == keys
    assert not [k for k, v in expected.items() if not torch.equal(converted[k], v)]


def test_kohya_names_are_sd_scripts_names() -> None:
    """sd-scripts' networks.lora_lumina: `lora_unet_` + the original path, the fused qkv whole."""
    arch = get_architecture("lumina2")
    assert arch.kohya_network_module == "networks.lora_lumina"
    names = {
        "lora_unet_layers_0_attention_qkv": ("to_q", "to_k", "to_v"),
        "lora_unet_noise_refiner_1_feed_forward_w1": ("feed_forward.linear_1",),
        "lora_unet_context_refiner_0_attention_out": ("attn.to_out.0",),
        "lora_unet_layers_25_adaLN_modulation_1": ("norm1.linear",),
        "lora_unet_final_layer_adaLN_modulation_1": ("norm_out.linear_1",),
    }
    flat = {kohya_flat("lora_unet_" + s.native): s.name for s in arch.modules.values() if s.native}
    flat |= {kohya_flat("lora_unet_" + g.native): g.name for g in arch.fused.values()}
    for name, ends in names.items():
        assert name in flat, name
        target = flat[name]
        parts = arch.fused[target].parts if target in arch.fused else (target,)
        assert all(p.endswith(e) for p, e in zip(parts, ends, strict=True)), (name, parts)


# -- a LoRA diffusers saved, on a tiny Lumina 2 transformer ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """The tiny model as a diffusers folder and as an original single file; a diffusers-saved LoRA; and
    diffusers' fused weights with it."""
    root = tmp_path_factory.mktemp("lumina2")
    torch.manual_seed(0)
    model = Lumina2Transformer2DModel(**TINY)
    checkpoint = base_checkpoint(get_architecture("lumina2"), {"transformer": model})
    checkpoint = {PREFIX + k: v for k, v in checkpoint.items()}
    checkpoint[PREFIX + "norm_final.weight"] = torch.ones(TINY["hidden_size"])  # unused; in the original files
    single = root / "lumina2_tiny.safetensors"
    save_file(checkpoint, str(single))
    n = TINY["num_refiner_layers"]
    targets = [f"layers.{i}.{t}" for i in range(TINY["num_layers"]) for t in [*ATTN_FF, "norm1.linear"]]
    targets += [f"noise_refiner.{i}.{t}" for i in range(n) for t in [*ATTN_FF, "norm1.linear"]]
    targets += [f"context_refiner.{i}.{t}" for i in range(n) for t in ATTN_FF]
    targets += TOP_TARGETS
    dit = tiny_dit(root, model, "Lumina2Pipeline", Lumina2LoraLoaderMixin, targets)
    return dict(folder=dit.folder, single=single, lora=dit.lora, before=dit.before, fused=dit.fused, targets=targets)


def updates(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """module -> B @ A of a diffusers-named LoRA state dict (`transformer.` keys, no alphas)."""
    out = {}
    for key, down in state.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            out[module] = state[module + ".lora_B.weight"].double() @ down.double()
    return out


def for_diffusers_converter(tensors: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Our kohya or ComfyUI file as diffusers' Lumina 2 converter reads one: `diffusion_model.` + the
    original name, lora_A/lora_B with alpha / rank folded into B, block modules only."""
    arch = get_architecture("lumina2")
    native = {kohya_flat("lora_unet_" + s.native): s.native for s in arch.modules.values() if s.native}
    native |= {kohya_flat("lora_unet_" + g.native): g.native for g in arch.fused.values()}
    out = {}
    for key, down in tensors.items():
        if not key.endswith(".lora_down.weight"):
            continue
        module = key.removesuffix(".lora_down.weight")
        up, alpha = tensors[module + ".lora_up.weight"], tensors.get(module + ".alpha")
        name = native[module] if layout == "kohya" else module.removeprefix("diffusion_model.")
        if not name.startswith(BLOCKS):
            continue  # the converter knows only the blocks' modules
        scale = 1.0 if alpha is None else alpha.item() / down.shape[0]
        out[f"diffusion_model.{name}.lora_A.weight"] = down
        out[f"diffusion_model.{name}.lora_B.weight"] = up * scale
    return out


def test_diffusers_lora_is_read_as_lumina2(tiny) -> None:
    report = loratool.inspect(tiny["lora"])
    assert report.format == "diffusers" and report.architecture == "lumina2"
    assert {m.name.removeprefix("transformer.") for m in report.modules} == set(tiny["targets"])
    assert not [f for f in report.findings if f.severity == "error"]


def test_kohya_and_comfyui_outputs_through_diffusers_lumina2_converter(tiny, tmp_path, tiny_split) -> None:
    from deltas import deltas

    ours = deltas(tiny["lora"])
    blocks = {k for k in ours if k.removeprefix("transformer.").startswith(BLOCKS)}
    for to in ("kohya", "comfyui"):
        out = tmp_path / f"{to}.safetensors"
        loratool.convert(tiny["lora"], to, out)
        tensors = load_file(str(out))
        fused = {"kohya": "lora_unet_layers_0_attention_qkv.", "comfyui": "diffusion_model.layers.0.attention.qkv."}
        assert any(k.startswith(fused[to]) for k in tensors), sorted(tensors)[:4]
        assert loratool.inspect(out).architecture == "lumina2"
        theirs = updates(_convert_non_diffusers_lumina2_lora_to_diffusers(for_diffusers_converter(tensors, to)))
        assert set(theirs) == blocks
        for module, value in theirs.items():
            torch.testing.assert_close(
                value, ours[module].double(), rtol=1e-5, atol=1e-7, msg=lambda m, k=module: f"{k}: {m}"
            )
        back = tmp_path / f"{to}_back.safetensors"
        loratool.convert(out, "diffusers", back)
        for got in (deltas(out), deltas(back)):
            assert set(got) == set(ours)
            for key in ours:
                torch.testing.assert_close(got[key], ours[key], rtol=1e-5, atol=1e-6)


def test_merge_into_the_diffusers_folder_equals_fuse_lora(tiny, tmp_path) -> None:
    assert_folder_merge_is_fuse(
        tiny["folder"], tiny["lora"], tiny["before"], tiny["fused"], tiny["targets"], tmp_path / "merged"
    )


def test_merge_into_the_original_single_file_equals_fuse_lora_after_diffusers_converter(
    tiny, tmp_path, tiny_split
) -> None:
    assert_single_file_merge_is_fuse(
        tiny["single"], tiny["lora"], tiny["fused"], lambda sd: convert_lumina2_to_diffusers(bare(sd)), tmp_path
    )


@pytest.mark.parametrize("prefix", ["lora_transformer_", "lycoris_"])
def test_onetrainer_and_simpletuner_names_read_as_the_same_lora(tiny, tmp_path, prefix: str) -> None:
    """OneTrainer (`lora_transformer_`) and SimpleTuner's LyCORIS (`lycoris_`): the diffusers path with
    underscores, kohya tensor names, an alpha per module."""
    from deltas import deltas

    scales = {m.name.removeprefix("transformer."): m.scale for m in loratool.inspect(tiny["lora"]).modules}
    renamed = {}
    for key, value in load_file(str(tiny["lora"])).items():
        module, _, factor = key.removeprefix("transformer.").rpartition(".lora_")
        name = prefix + module.replace(".", "_")
        if factor.startswith("A"):
            renamed[f"{name}.lora_down.weight"] = value
            renamed[f"{name}.alpha"] = torch.tensor(scales[module] * value.shape[0])
        else:
            renamed[f"{name}.lora_up.weight"] = value
    path = tmp_path / "renamed.safetensors"
    save_file(renamed, str(path))
    assert loratool.inspect(path).architecture == "lumina2"
    want, got = deltas(tiny["lora"]), deltas(path)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=0)


# -- real widths ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["diffusers", "comfyui"])
def test_real_widths_are_read_as_lumina2(tmp_path, layout: str) -> None:
    """Two modules at the published widths (2304 wide, k of 768 rows, MLP of 9216): Lumina 2, in
    diffusers' names and in the original names other families of the same lineage share."""
    if layout == "diffusers":
        shapes = {
            "transformer.layers.0.attn.to_k": (768, 2304),
            "transformer.layers.0.feed_forward.linear_1": (9216, 2304),
        }
    else:
        shapes = {
            "diffusion_model.layers.0.attention.qkv": (3840, 2304),
            "diffusion_model.layers.0.feed_forward.w1": (9216, 2304),
        }
    tensors = {}
    for key, (rows, cols) in shapes.items():
        down, up = ("lora_A", "lora_B") if layout == "diffusers" else ("lora_down", "lora_up")
        tensors[f"{key}.{down}.weight"] = torch.zeros(4, cols)
        tensors[f"{key}.{up}.weight"] = torch.zeros(rows, 4)
    path = tmp_path / f"{layout}.safetensors"
    save_file(tensors, str(path))
    assert loratool.inspect(path).architecture == "lumina2"
