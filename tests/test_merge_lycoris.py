"""LyCORIS as the oracle: networks built by lycoris-lora itself on the tiny SD1.5 UNet and CLIP,
weights randomized and saved with its own save routine, then merged by loratool into a single-file
base. Every adapted layer, run plainly with the merged weight, must give what the LyCORIS-wrapped
layer gives on random inputs. Alphas differ from ranks throughout, so a scale applied twice (as
LyCORIS's own merge path does for LoHa/LoKr) or not at all would show.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_merge_diffusers import base_checkpoint
from tiny_models import kohya_clip, sd15_unet

from loratool import merge
from loratool.archs import get_architecture
from loratool.archs.locate import locate
from loratool.io.source import open_source

pytest.importorskip("lycoris")
from make_fixtures import lycoris_network

SD1 = get_architecture("sd1")
TOLERANCE = 1e-5  # relative to the layer's output

# (algo, dim, alpha, conv_dim, conv_alpha, name_algo_map, create_network options)
# Tensor names each file must hold, so the layouts under test are really there.
EXPECTED_KEYS = {
    "loha": ("hada_w1_a", "hada_w2_b"),
    "loha-tucker": ("hada_t1", "hada_t2"),
    "lokr": ("lokr_w1_a", "lokr_w2_a", "lokr_w2"),
    "locon-tucker": ("lora_mid",),
    "mixed": ("lora_down", "hada_w1_a", "diff", "diff_b"),
    "ia3": ("weight", "on_input"),
    "glora": ("a1", "a2", "b1", "b2"),
    "dora": ("dora_scale", "lora_down", "hada_w1_a", "lokr_w1"),
    "norm": ("w_norm", "b_norm", "lora_down"),
}
ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"
CONFIGS = {
    "loha": ("loha", 4, 2.0, 4, 1.0, {}, {}),
    "loha-tucker": ("loha", 4, 3.0, 4, 2.0, {}, {"use_tucker": True}),
    "lokr": (
        "lokr",
        2,
        1.0,
        2,
        3.0,
        {
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v": {"algo": "lokr", "full_matrix": True},
            "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj": {"algo": "lokr", "decompose_both": True},
        },
        {},
    ),
    "locon-tucker": ("locon", 4, 2.0, 4, 1.0, {}, {"use_tucker": True}),
    # One file of several kinds: LoCon convs, LoHa attention, a full diff (weight and bias).
    "mixed": (
        "locon",
        4,
        2.0,
        4,
        1.0,
        {
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": {"algo": "loha"},
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": {"algo": "loha"},
            "mid_block.attentions.0.transformer_blocks.0.attn1.to_q": {"algo": "full"},
            "down_blocks.0.attentions.0.proj_in": {"algo": "full"},
        },
        {},
    ),
    # IA3 scales output rows, or input columns where trained on the input.
    "ia3": (
        "ia3",
        4,
        2.0,
        4,
        1.0,
        {
            f"{ATTN}.attn2.to_k": {"algo": "ia3", "train_on_input": True},
            "down_blocks.1.resnets.0.conv2": {"algo": "ia3", "train_on_input": True},
        },
        {},
    ),
    "glora": ("glora", 4, 2.0, 4, 3.0, {}, {}),
    # DoRA (weight_decompose) on LoCon, LoHa and LoKr, the norm per output row and, where
    # wd_on_out is off, per input column.
    "dora": (
        "locon",
        4,
        2.0,
        4,
        1.0,
        {
            f"{ATTN}.attn1.to_q": {"algo": "loha", "weight_decompose": True},
            f"{ATTN}.attn2.to_k": {"algo": "lokr", "weight_decompose": True},
            f"{ATTN}.attn2.to_v": {"algo": "locon", "weight_decompose": True, "wd_on_out": False},
            "down_blocks.1.resnets.0.conv2": {"algo": "locon", "weight_decompose": True, "wd_on_out": False},
        },
        {"dora_wd": True},
    ),
    # LayerNorm and GroupNorm layers as norm diffs, beside LoCon modules.
    "norm": ("locon", 4, 2.0, 4, 1.0, {}, {"train_norm": True}),
}


def save_base(unet: torch.nn.Module, te: torch.nn.Module, tmp: Path, layout: str) -> Path:
    """The base the LoRA is merged into: an SD1.5 single file, or a diffusers pipeline folder."""
    if layout == "single-file":
        base = tmp / "base.safetensors"
        save_file(base_checkpoint(SD1, {"unet": unet, "text_encoder": te}), str(base))
        return base
    base = tmp / "pipeline"
    unet.save_pretrained(base / "unet")
    te.text_model.save_pretrained(base / "text_encoder")  # a CLIPTextModel under kohya_clip's extra level
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
    }
    (base / "model_index.json").write_text(json.dumps(index))
    return base


def all_tensors(path: Path) -> dict[str, torch.Tensor]:
    with open_source(path) as source:
        return {key: source.load(key) for key in source}


def build(name: str, tmp: Path, layout: str = "single-file"):
    algo, dim, alpha, conv_dim, conv_alpha, name_algo_map, options = CONFIGS[name]
    torch.manual_seed(0)
    unet, te = sd15_unet(), kohya_clip()
    base = save_base(unet, te, tmp, layout)
    network = lycoris_network(algo, dim, alpha, conv_dim, conv_alpha, name_algo_map, (unet, te), **options)
    # Large enough that a Hadamard product of two low-rank products still moves the outputs visibly.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, param in sorted(network.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    lora = tmp / f"{name}.safetensors"
    network.save_weights(str(lora), torch.float32, {"ss_network_module": "lycoris.kohya"})
    return network, base, lora


def plain_output(layer: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor):
    """The layer's op with these parameters (a LyCORIS full module takes the weight off its layer)."""
    if isinstance(layer, torch.nn.LayerNorm):
        return torch.nn.functional.layer_norm(x, layer.normalized_shape, weight, bias, layer.eps)
    if isinstance(layer, torch.nn.GroupNorm):
        return torch.nn.functional.group_norm(x, layer.num_groups, weight, bias, layer.eps)
    if isinstance(layer, torch.nn.Conv2d):
        return layer._conv_forward(x, weight.reshape(layer.out_channels, -1, *layer.kernel_size), bias)
    return torch.nn.functional.linear(x, weight.reshape(layer.out_features, layer.in_features), bias)


def random_input(layer: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
    if isinstance(layer, torch.nn.LayerNorm):
        return torch.randn(3, *layer.normalized_shape, generator=g)
    if isinstance(layer, torch.nn.GroupNorm):
        return torch.randn(2, layer.num_channels, 8, 8, generator=g)
    if isinstance(layer, torch.nn.Conv2d):
        return torch.randn(2, layer.in_channels, 8, 8, generator=g)
    return torch.randn(3, layer.in_features, generator=g)


def check_layers(network, merged_path: Path, base: Path, visible: float) -> set[str]:
    """Every layer the LyCORIS network adapts, run plainly with its merged weight, against the
    wrapped layer's output on random inputs (and visibly changed by at least `visible`, relative);
    returns the layer types seen."""
    merged, original = all_tensors(merged_path), all_tensors(base)
    g = torch.Generator().manual_seed(2)
    layer_types = set()
    with open_source(merged_path) as source, torch.no_grad():
        for module in network.loras:
            layer = module.org_module[0]
            layer_types.add(type(layer).__name__)
            (location,) = locate(SD1, SD1.kohya_index[module.lora_name], source, lambda k: source.info(k).shape)
            bias_key = location.key.removesuffix("weight") + "bias"
            x = random_input(layer, g)
            want = layer(x)  # the LyCORIS-wrapped forward
            got = plain_output(layer, merged[location.key], merged.get(bias_key), x)
            before = plain_output(layer, original[location.key], original.get(bias_key), x)
            assert float((want - before).norm()) > visible * float(want.norm()), f"{module.lora_name}: no update"
            error = float((got - want).norm() / want.norm())
            assert error <= TOLERANCE, f"{module.lora_name} ({type(module).__name__}): {error:.3g}"
    return layer_types


@pytest.mark.parametrize("layout", ["single-file", "diffusers"])
@pytest.mark.parametrize("strength", [1.0, 0.5, -0.7])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_merged_layers_compute_what_lycoris_computes(tmp_path, name, strength, layout):
    network, base, lora = build(name, tmp_path, layout)
    for module in network.loras:
        module.multiplier = strength
    out = tmp_path / ("merged.safetensors" if layout == "single-file" else "merged")
    report = merge(base, [lora], out, weights=[strength], device="cpu")
    assert report.loras[0].matched == len(network.loras) and not report.loras[0].unmatched
    layer_types = check_layers(network, out, base, visible=1e-3)
    saved = load_file(str(lora))
    for part in EXPECTED_KEYS[name]:
        assert any(f".{part}." in k or k.endswith(f".{part}") for k in saved), f"no {part} in the {name} file"
    assert {"Conv2d", "Linear"} <= layer_types
    assert name != "norm" or {"LayerNorm", "GroupNorm"} <= layer_types


PEFT_CONFIGS = {
    "loha": lambda peft: peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "loha-rank-pattern": lambda peft: peft.LoHaConfig(
        r=4, alpha=8, target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3}
    ),
    "lokr": lambda peft: peft.LoKrConfig(r=4, alpha=2, target_modules=["q_proj", "v_proj", "down_proj"]),
    "lokr-both": lambda peft: peft.LoKrConfig(r=2, alpha=3, target_modules=["q_proj", "o_proj"], decompose_both=True),
}


@pytest.mark.parametrize("name", list(PEFT_CONFIGS))
def test_peft_loha_and_lokr_merge_like_merge_and_unload(tmp_path, name):
    peft = pytest.importorskip("peft")
    from tiny_models import llama

    torch.manual_seed(0)
    model = llama()
    model.save_pretrained(tmp_path / "base")
    config = PEFT_CONFIGS[name](peft)
    config.init_weights = False  # random factors: a zero update would prove nothing
    wrapped = peft.get_peft_model(model, config)
    wrapped.save_pretrained(tmp_path / "adapter")
    merge(tmp_path / "base", [tmp_path / "adapter"], tmp_path / "merged", device="cpu")
    ours = load_file(str(tmp_path / "merged" / "model.safetensors"))
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    theirs = wrapped.merge_and_unload().state_dict()
    changed = 0
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], rtol=0, atol=1e-6, msg=key)
        changed += not torch.equal(value, base[key])
    assert changed == len(wrapped.peft_config["default"].target_modules) * 2  # every adapted layer moved


KIND_OF = {
    "LoConModule": "lora",
    "LohaModule": "loha",
    "LokrModule": "lokr",
    "FullModule": "full",
    "IA3Module": "ia3",
    "GLoRAModule": "glora",
    "NormModule": "norm",
}
NO_RANK = ("FullModule", "IA3Module", "NormModule")  # applied at scale 1, whatever alpha says


@pytest.mark.parametrize("name", list(CONFIGS))
def test_inspect_names_each_modules_kind_rank_alpha_and_scale_as_lycoris_built_it(tmp_path, name):
    from loratool import inspect

    network, _, lora = build(name, tmp_path)
    report = inspect(lora)
    assert report.architecture == "sd1" and not report.unexplained
    assert not [f for f in report.findings if f.severity == "error"]
    ours = {m.name: m for m in report.modules}
    assert set(ours) == {m.lora_name for m in network.loras}
    for module in network.loras:
        got, cls = ours[module.lora_name], type(module).__name__
        assert got.kind == KIND_OF[cls] + ("+dora" if getattr(module, "wd", False) else ""), module.lora_name
        full_kron = cls == "LokrModule" and module.use_w1 and module.use_w2
        if cls in NO_RANK:
            assert (got.rank, got.alpha, got.scale) == (None, None, 1.0), module.lora_name
            if cls == "IA3Module":  # only the scaled axis is known
                layer = module.org_module[0]
                width = layer.weight.shape[1 if module.train_input else 0]
                axis = 1 if module.train_input else 0
                assert got.shape[axis] == width and got.shape[1 - axis] is None, (module.lora_name, got.shape)
            continue
        assert got.rank == (None if full_kron else module.lora_dim), module.lora_name
        assert got.alpha == pytest.approx(float(module.alpha)), module.lora_name
        assert got.scale == pytest.approx(1.0 if full_kron else module.scale), module.lora_name


@pytest.mark.parametrize(("name", "kind"), [("mixed", "full"), ("ia3", "ia3"), ("glora", "glora"), ("norm", "norm")])
def test_combine_and_resize_refuse_kinds_that_are_not_low_rank_products(tmp_path, name, kind):
    """combine stacks low-rank factors and resize truncates them: neither exists for these kinds,
    so both refuse in one line naming a module of that kind, and write nothing."""
    from loratool import combine, inspect, resize
    from loratool.errors import ConversionError, ResizeError

    _, _, lora = build(name, tmp_path)
    named = {m.name for m in inspect(lora).modules if m.kind == kind}
    for call, error in (
        (lambda out: combine([lora, lora], out), ConversionError),
        (lambda out: resize(lora, out, rank=1), ResizeError),
    ):
        out = tmp_path / "out.safetensors"
        with pytest.raises(error) as caught:
            call(out)
        assert str(caught.value).split(":")[0] in named and "\n" not in str(caught.value)
        assert not out.exists()
