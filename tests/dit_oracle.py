"""What the DiT family tests share: a tiny diffusers transformer saved as a diffusers folder, a LoRA
diffusers itself saves on it, and diffusers' own fused weights with that LoRA (the oracle for merge)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file


@dataclass
class TinyDiT:
    folder: Path  # a diffusers folder: model_index.json and transformer/
    lora: Path  # the LoRA diffusers saved (`save_lora_weights`)
    before: dict[str, torch.Tensor]  # the transformer's weights
    fused: dict[str, torch.Tensor]  # with the LoRA loaded and fused by diffusers (`fuse_lora`)
    targets: list[str]


def tiny_dit(root: Path, model: torch.nn.Module, pipeline: str, loader: type, targets: list[str]) -> TinyDiT:
    """Save `model` as `pipeline`'s transformer, add a random LoRA (rank 4, alpha 6, proj_out at rank
    2) on `targets` with PEFT, save it with `loader` and fuse it."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    before = {k: v.clone() for k, v in model.state_dict().items()}
    folder = root / "model"
    model.save_pretrained(folder / "transformer")
    index = {"_class_name": pipeline, "transformer": ["diffusers", type(model).__name__]}
    (folder / "model_index.json").write_text(json.dumps(index))
    config = LoraConfig(
        r=4, lora_alpha=6, target_modules=targets, init_lora_weights=False, rank_pattern={"proj_out": 2}
    )
    model.add_adapter(config)
    loader.save_lora_weights(
        root / "lora",
        transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    model.fuse_lora()
    fused = {k.replace(".base_layer.", "."): v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    return TinyDiT(folder, root / "lora" / "pytorch_lora_weights.safetensors", before, fused, targets)


def assert_folder_merge_is_fuse(
    folder: Path, lora: Path, before: dict[str, torch.Tensor], fused: dict[str, torch.Tensor], targets, dest: Path
) -> None:
    """loratool's merge into the diffusers folder changes exactly the targets' weights, to diffusers'
    `load_lora_adapter` + `fuse_lora` result."""
    from safetensors.torch import load_file

    import loratool

    loratool.merge(folder, [lora], dest, device="cpu")
    got = load_file(str(dest / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert {k for k in got if not torch.equal(got[k], before[k])} == {t + ".weight" for t in targets}
    for key, value in got.items():
        torch.testing.assert_close(value, fused[key], rtol=1e-5, atol=1e-6)


def assert_single_file_merge_is_fuse(
    single: Path,
    lora: Path,
    fused: dict[str, torch.Tensor],
    to_diffusers: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    tmp_path: Path,
    layouts: tuple[str, ...] = ("comfyui",),
) -> None:
    """Merging `lora`, and loratool's conversions of it to `layouts`, into the original single file,
    then mapping the merged file to diffusers names with the family's converter, gives diffusers'
    own fused weights."""
    import loratool

    loras = [lora]
    for layout in layouts:
        loras.append(tmp_path / f"{layout}.safetensors")
        loratool.convert(lora, layout, loras[-1])
    for each in loras:
        out = tmp_path / f"merged_{each.stem}.safetensors"
        loratool.merge(single, [each], out, device="cpu")
        converted = to_diffusers(dict(load_file(str(out))))
        assert set(converted) == set(fused)
        for key, value in fused.items():
            torch.testing.assert_close(converted[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
