"""mlx-lm adapter folders (issue 19): read, inspected, converted to PEFT and back, merged.

mlx stores `lora_a` (in, r) and `lora_b` (r, out) and applies `scale * (x @ lora_a) @ lora_b`, with
`lora_parameters.scale` from its own adapter_config.json; DoRA adds `m`, the merged weight's norm per
output row. mlx itself does not run here (it is built for Apple silicon), so the oracle is its update
written out: W + scale * (lora_a @ lora_b)^T, and for DoRA m * w / ||w|| per row of that w. PEFT is
the oracle for the converted adapter (`PeftModel.from_pretrained` + `merge_and_unload`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from from_headers import build, header
from safetensors.torch import load_file, save_file
from tiny_models import llama

import loratool
from loratool.errors import ConversionError

peft = pytest.importorskip("peft")

RANK, SCALE = 4, 10.0
TARGETS = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]


def mlx_folder(root: Path, dora: bool = False, scale: float = SCALE) -> tuple[Path, dict[str, torch.Tensor]]:
    """An mlx-lm adapter for the tiny Llama, as mlx-lm's `save_adapters` writes it (both layers)."""
    model = llama()
    weights = dict(model.named_parameters())
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for layer in range(2):
        for target in TARGETS:
            path = f"model.layers.{layer}.{target}"
            out, inp = weights[f"{path}.weight"].shape
            tensors[f"{path}.lora_a"] = torch.randn(inp, RANK, generator=g) * 0.1
            tensors[f"{path}.lora_b"] = torch.randn(RANK, out, generator=g) * 0.1
            if dora:
                tensors[f"{path}.m"] = weights[f"{path}.weight"].detach().norm(dim=1) * (
                    1 + 0.1 * torch.rand(out, generator=g)
                )
    root.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(root / "adapters.safetensors"))
    config = {
        "fine_tune_type": "dora" if dora else "lora",
        "num_layers": 2,
        "model": "/models/TinyLlama",
        "lora_parameters": {"rank": RANK, "alpha": 16, "dropout": 0.0, "scale": scale, "keys": TARGETS},
        "iters": 100,
    }
    (root / "adapter_config.json").write_text(json.dumps(config))
    return root, tensors


def mlx_merged(tensors: dict[str, torch.Tensor], scale: float = SCALE) -> dict[str, torch.Tensor]:
    """What mlx-lm's fuse computes, written out with torch."""
    weights = {k: v.detach().clone() for k, v in llama().state_dict().items()}
    for key in [k for k in tensors if k.endswith(".lora_a")]:
        path = key[: -len(".lora_a")]
        w = weights[f"{path}.weight"] + scale * (tensors[key] @ tensors[f"{path}.lora_b"]).T
        if f"{path}.m" in tensors:
            w = tensors[f"{path}.m"][:, None] * w / w.norm(dim=1, keepdim=True)
        weights[f"{path}.weight"] = w
    return weights


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("llama")
    llama().save_pretrained(directory)
    return directory


def test_the_real_mlx_folder_is_read_with_its_scale(tmp_path) -> None:
    folder = build("mlx-lm-adapters", tmp_path / "adapters", folder_file="adapters.safetensors")
    report = loratool.inspect(folder)
    assert (report.format, report.architecture) == ("mlx", "qwen2")
    assert len(report.modules) == len(header("mlx-lm-adapters")["tensors"]) // 2 == 8
    assert {(m.rank, m.scale, tuple(m.shape)) for m in report.modules} >= {(8, 10.0, (896, 896)), (8, 10.0, (128, 896))}
    assert report.findings == []  # a scale mlx users set outright is not "unusual"


@pytest.mark.parametrize("dora", [False, True])
def test_merge_applies_the_mlx_update(base, tmp_path, dora) -> None:
    folder, tensors = mlx_folder(tmp_path / "adapters", dora=dora)
    loratool.merge(base, [folder], tmp_path / "merged", device="cpu")
    got = load_file(str(tmp_path / "merged" / "model.safetensors"))
    want = mlx_merged(tensors)
    changed = {k for k in got if not torch.equal(got[k], llama().state_dict()[k])}
    assert changed == {f"model.layers.{i}.{t}.weight" for i in range(2) for t in TARGETS}
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("dora", [False, True])
def test_peft_loads_the_converted_adapter_and_merges_the_same(base, tmp_path, dora) -> None:
    from peft import PeftModel

    folder, tensors = mlx_folder(tmp_path / "adapters", dora=dora)
    loratool.convert(folder, "peft", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_dora"]) == (RANK, SCALE * RANK, dora)
    model = PeftModel.from_pretrained(llama(), tmp_path / "peft").merge_and_unload()
    want = mlx_merged(tensors)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("dora", [False, True])
def test_peft_converts_back_to_the_same_mlx_folder(tmp_path, dora) -> None:
    folder, tensors = mlx_folder(tmp_path / "adapters", dora=dora)
    loratool.convert(folder, "peft", tmp_path / "peft")
    loratool.convert(tmp_path / "peft", "mlx", tmp_path / "back")
    back = load_file(str(tmp_path / "back" / "adapters.safetensors"))
    assert back.keys() == tensors.keys()
    for key, value in tensors.items():
        assert torch.equal(back[key], value), key
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == ("dora" if dora else "lora") and config["num_layers"] == -1
    assert config["lora_parameters"]["rank"] == RANK and config["lora_parameters"]["scale"] == SCALE
    assert sorted(config["lora_parameters"]["keys"]) == sorted(TARGETS)
    again = loratool.inspect(tmp_path / "back")
    assert again.format == "mlx" and {(m.rank, m.scale) for m in again.modules} == {(RANK, SCALE)}


def test_an_adapter_with_several_scales_has_no_mlx_form(tmp_path) -> None:
    """PEFT's alpha_pattern gives modules their own scale; mlx-lm has one."""
    folder, _ = mlx_folder(tmp_path / "adapters")
    loratool.convert(folder, "peft", tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["alpha_pattern"] = {"model.layers.1.mlp.down_proj": 8}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="one rank and one scale"):
        loratool.convert(tmp_path / "peft", "mlx", tmp_path / "mlx")
    assert not (tmp_path / "mlx").exists()


def test_a_full_fine_tune_folder_is_refused_by_name(tmp_path) -> None:
    folder, _ = mlx_folder(tmp_path / "adapters")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["fine_tune_type"] = "full"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(loratool.errors.FormatError, match="saves weights, not an adapter"):
        loratool.inspect(folder)


def test_resize_and_combine_keep_the_mlx_layout(base, tmp_path) -> None:
    """Both write the source's own layout when not told otherwise; the result is the update mlx
    would apply: combine of two copies at weight 0.5 each is the adapter itself."""
    folder, tensors = mlx_folder(tmp_path / "adapters")
    loratool.resize(folder, tmp_path / "resized", rank=RANK)
    loratool.combine([folder, folder], tmp_path / "combined", weights=[0.5, 0.5])
    for out in ("resized", "combined"):
        assert loratool.inspect(tmp_path / out).format == "mlx"
        loratool.merge(base, [tmp_path / out], tmp_path / f"merged_{out}", device="cpu")
        got = load_file(str(tmp_path / f"merged_{out}" / "model.safetensors"))
        want = mlx_merged(tensors)
        for key in got:
            where = f"{out} {key}"
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=lambda m, w=where: f"{w}: {m}")


def test_extract_writes_an_mlx_folder(base, tmp_path) -> None:
    folder, tensors = mlx_folder(tmp_path / "adapters")
    loratool.merge(base, [folder], tmp_path / "tuned", device="cpu")
    report = loratool.extract(base, tmp_path / "tuned", tmp_path / "extracted", rank=RANK, to="mlx", device="cpu")
    assert report.target == "mlx" and len(report.modules) == len(tensors) // 2
    again = loratool.inspect(tmp_path / "extracted")
    assert again.format == "mlx" and len(again.modules) == len(tensors) // 2
    loratool.merge(base, [tmp_path / "extracted"], tmp_path / "remerged", device="cpu")
    got = load_file(str(tmp_path / "remerged" / "model.safetensors"))
    want = mlx_merged(tensors)
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
