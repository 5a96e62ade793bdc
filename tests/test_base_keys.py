"""A model no table knows (issue 19): with a base, the base's own keys are the table.

lycoris-lora wraps any torch model (`create_lycoris`) and names modules `lycoris_` + path with '_';
kohya-style trainers on custom models write `lora_unet_` + path. Merged into that model's saved state
dict, every adapted layer must give what the LyCORIS-wrapped model computes.
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import loratool
from loratool.errors import MergeError

lycoris = pytest.importorskip("lycoris")


class Custom(nn.Module):
    """No table has these paths: convs of two kernels, nested blocks, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1)) for _ in range(2)
        )
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.mean((2, 3)))


def custom() -> Custom:
    torch.manual_seed(0)
    return Custom()


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
def test_a_lycoris_network_on_any_model_merges_into_its_state_dict(tmp_path, algo) -> None:
    from lycoris import LycorisNetwork, create_lycoris

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    base = tmp_path / "base.safetensors"
    save_file(custom().state_dict(), str(base))
    model = custom()
    LycorisNetwork.apply_preset({"target_name": ["stem", "blocks.0.0", "blocks.0.2", "blocks.1.0", "head"]})
    network = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=8, algo=algo)
    network.apply_to()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, param in sorted(network.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=g) * 0.2)
    lora = tmp_path / "lora.safetensors"
    network.save_weights(str(lora), torch.float32, {})

    report = loratool.merge(base, [lora], tmp_path / "merged.safetensors", device="cpu")
    assert report.loras[0].unmatched == [] and report.loras[0].matched == len(network.loras)
    plain = custom()
    plain.load_state_dict(load_file(str(tmp_path / "merged.safetensors")))
    x = torch.randn(2, 3, 8, 8, generator=g)
    with torch.no_grad():
        want, got, before = model(x), plain(x), custom()(x)
    assert float((want - before).norm()) > 1e-3 * float(want.norm())
    assert float((got - want).norm() / want.norm()) <= 1e-5


def _kohya_file(path, names_and_shapes) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (out, inp) in names_and_shapes.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(2, inp, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, 2, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(path))


def test_kohya_names_find_prefixed_base_keys(tmp_path) -> None:
    """A checkpoint that stores `model.diffusion_model.` before the paths the LoRA names."""
    base = tmp_path / "base.safetensors"
    weights = {
        "model.diffusion_model.blocks.0.proj.weight": torch.zeros(6, 4),
        "model.diffusion_model.out.weight": torch.zeros(3, 6),
    }
    save_file(weights, str(base))
    lora = tmp_path / "lora.safetensors"
    _kohya_file(lora, {"lora_unet_blocks_0_proj": (6, 4), "lora_unet_out": (3, 6)})
    loratool.merge(base, [lora], tmp_path / "merged.safetensors", device="cpu")
    merged, tensors = load_file(str(tmp_path / "merged.safetensors")), load_file(str(lora))
    want = tensors["lora_unet_blocks_0_proj.lora_up.weight"] @ tensors["lora_unet_blocks_0_proj.lora_down.weight"]
    torch.testing.assert_close(merged["model.diffusion_model.blocks.0.proj.weight"], want)


def test_two_base_keys_that_flatten_alike_are_refused_by_name(tmp_path) -> None:
    base = tmp_path / "base.safetensors"
    save_file({"a.b_c.weight": torch.zeros(4, 4), "a_b.c.weight": torch.zeros(4, 4)}, str(base))
    lora = tmp_path / "lora.safetensors"
    _kohya_file(lora, {"lora_unet_a_b_c": (4, 4)})
    with pytest.raises(MergeError, match=r"a\.b_c\.weight and a_b\.c\.weight both spell this name"):
        loratool.merge(base, [lora], tmp_path / "merged.safetensors", device="cpu")
    assert not (tmp_path / "merged.safetensors").exists()


def test_names_the_base_lacks_are_still_a_wrong_base(tmp_path) -> None:
    base = tmp_path / "base.safetensors"
    save_file({"other.weight": torch.zeros(4, 4)}, str(base))
    lora = tmp_path / "lora.safetensors"
    _kohya_file(lora, {"lora_unet_missing_layer": (4, 4)})
    with pytest.raises(MergeError, match="wrong base"):
        loratool.merge(base, [lora], tmp_path / "merged.safetensors", device="cpu")


def test_inspect_with_the_base_checks_modules_against_its_keys(tmp_path) -> None:
    base = tmp_path / "base.safetensors"
    save_file({"blocks.0.proj.weight": torch.zeros(6, 4), "out.weight": torch.zeros(3, 5)}, str(base))
    lora = tmp_path / "lora.safetensors"
    _kohya_file(lora, {"lora_unet_blocks_0_proj": (6, 4), "lora_unet_out": (3, 6)})
    alone = loratool.inspect(lora)
    assert alone.architecture is None
    report = loratool.inspect(lora, base=base)
    assert "found among the base's keys" in report.architecture_reason
    problems = {(f.code, f.module) for f in report.findings if f.severity == "error"}
    assert problems == {("shape-mismatch", "lora_unet_out")}  # 3 x 6 update, 3 x 5 weight


@pytest.mark.parametrize("to", ["kohya", "peft"])
def test_extract_from_a_model_no_table_knows_and_merge_back(tmp_path, to) -> None:
    """The base's own Linear and conv weights are the modules: a rank-2 change of every layer is
    extracted at rank 2 and merges back into the tuned weights."""
    base_sd = custom().state_dict()
    g = torch.Generator().manual_seed(4)
    tuned_sd = dict(base_sd)
    for key, value in base_sd.items():
        if key.endswith(".weight"):
            flat = value.reshape(value.shape[0], -1)
            delta = torch.randn(flat.shape[0], 2, generator=g) @ torch.randn(2, flat.shape[1], generator=g)
            tuned_sd[key] = value + 0.05 * delta.reshape(value.shape)
    base, tuned = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    save_file(base_sd, str(base))
    save_file(tuned_sd, str(tuned))
    out = tmp_path / ("lora.safetensors" if to == "kohya" else "lora")
    report = loratool.extract(base, tuned, out, rank=2, conv_rank=2, to=to, device="cpu")
    assert report.architecture == "base checkpoint" and len(report.modules) == 6
    merged = loratool.merge(base, [out], tmp_path / "merged.safetensors", device="cpu")
    assert merged.loras[0].unmatched == []
    got = load_file(str(tmp_path / "merged.safetensors"))
    for key in base_sd:
        if key.endswith(".weight"):
            torch.testing.assert_close(got[key], tuned_sd[key], rtol=1e-4, atol=1e-5)
