"""PEFT's adapter kinds beyond LoRA, LoHa and LoKr (issue 20), against PEFT itself on tiny models.

IA3: `merge_and_unload` of the adapter PEFT saved is the oracle for loratool's merge at strength 1;
other strengths interpolate the factor (W * (1 + s (l - 1))). Converted to LyCORIS's IA3 (kohya) and
back, PEFT loads it to the same weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import llama

import loratool
from loratool.errors import ConversionError, LoratoolError

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def ia3_adapter(tmp_path_factory):
    """IA3 on attention (output rows) and a feed-forward module (input columns), randomized."""
    from peft import IA3Config, get_peft_model

    root = tmp_path_factory.mktemp("ia3")
    model = get_peft_model(
        llama(), IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_l" in name:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=g))
    model.save_pretrained(root / "adapter")
    merged = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    base = root / "base"
    llama().save_pretrained(base)
    return root / "adapter", base, merged


def test_peft_ia3_is_inspected_as_what_it_is(ia3_adapter) -> None:
    adapter, _, _ = ia3_adapter
    report = loratool.inspect(adapter)
    assert report.format == "peft" and {m.kind for m in report.modules} == {"ia3-peft"}
    assert len(report.modules) == 6 and {m.rank for m in report.modules} == {None}
    assert not [f for f in report.findings if f.severity != "info"]


@pytest.mark.parametrize("strength", [1.0, 0.5, -0.5])
def test_peft_ia3_merge_equals_merge_and_unload(ia3_adapter, tmp_path, strength) -> None:
    adapter, base, merged = ia3_adapter
    loratool.merge(base, [adapter], tmp_path / "merged", weights=[strength], device="cpu")
    got = load_file(str(tmp_path / "merged" / "model.safetensors"))
    before = llama().state_dict()
    for key, value in got.items():
        want = before[key] + strength * (merged[key] - before[key])  # W * (1 + s (l - 1))
        torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
    changed = {k for k in got if not torch.equal(got[k], before[k])}
    assert len(changed) == 6


def test_peft_ia3_converts_to_lycoris_ia3_and_back(ia3_adapter, tmp_path) -> None:
    """PEFT's l is LyCORIS's 1 + w on the same axis: the kohya file is LyCORIS IA3 (feed-forward
    modules flagged on_input), merges to PEFT's weights, and converted back PEFT loads it unchanged."""
    from peft import PeftModel

    adapter, base, merged = ia3_adapter
    kohya = tmp_path / "ia3.safetensors"
    loratool.convert(adapter, "kohya", kohya)
    tensors = load_file(str(kohya))
    flags = {k.removesuffix(".on_input"): int(v) for k, v in tensors.items() if k.endswith(".on_input")}
    assert len(flags) == 6 and {k for k, v in flags.items() if v} == {k for k in flags if "mlp_down_proj" in k}
    assert all(tensors[f"{k}.weight"].dim() == 1 for k in flags)
    assert {m.kind for m in loratool.inspect(kohya).modules} == {"ia3"}
    loratool.merge(base, [kohya], tmp_path / "merged", device="cpu")
    for key, value in load_file(str(tmp_path / "merged" / "model.safetensors")).items():
        torch.testing.assert_close(value, merged[key], rtol=1e-5, atol=1e-6)
    loratool.convert(kohya, "peft", tmp_path / "back")
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and all("down_proj" in m for m in config["feedforward_modules"])
    reloaded = PeftModel.from_pretrained(llama(), tmp_path / "back").merge_and_unload().state_dict()
    for key, value in reloaded.items():
        torch.testing.assert_close(value, merged[key], rtol=1e-5, atol=1e-6)


def test_lycoris_ia3_keeps_its_vectors_through_kohya(ia3_adapter, tmp_path) -> None:
    """A LyCORIS IA3 module's vector is read under the axis its on_input flag names; written back,
    it is `.weight` again (it was once dropped, leaving only the flags)."""
    adapter, _, _ = ia3_adapter
    loratool.convert(adapter, "kohya", tmp_path / "a.safetensors")
    loratool.convert(tmp_path / "a.safetensors", "kohya", tmp_path / "b.safetensors")
    first, second = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert set(first) == set(second) and len(first) == 12
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_peft_ia3_is_refused_by_name_where_a_layout_cannot_hold_it(ia3_adapter, tmp_path) -> None:
    adapter, _, _ = ia3_adapter
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "IA3"
    with pytest.raises(ConversionError, match=r"IA3 \(PEFT\)"):
        loratool.convert(adapter, "diffusers", tmp_path / "out_diffusers")
    with pytest.raises(ConversionError, match=r"IA3 \(PEFT\)"):
        loratool.combine([adapter, adapter], tmp_path / "combined")
    with pytest.raises(LoratoolError, match=r"IA3 \(PEFT\)"):
        loratool.resize(adapter, tmp_path / "resized", rank=2)
    assert not (tmp_path / "combined").exists() and not (tmp_path / "resized").exists()
