"""Test oracle: every canonical module's update (scale * dW, its lora_B bias and DoRA magnitude),
computed straight from a file's modules, so two files can be compared whatever their layout."""

from __future__ import annotations

import torch

from loratool import load_adapter
from loratool.archs import Architecture


def deltas(path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    with load_adapter(path) as adapter:
        arch = adapter.arch
        for module in adapter.modules.values():
            tensors = adapter.tensors(module)
            found = {"": (module.scale * module.kind.delta(tensors)).flatten(1)}
            if "bias" in tensors:
                found[".bias"] = tensors["bias"].float().reshape(-1, 1)
            if module.dora_key:
                found[".dora"] = adapter.load(module.dora_key).float().reshape(-1, 1)
            for suffix, dense in found.items():
                if len(module.targets) == 1:
                    target = module.targets[0]
                    if (
                        isinstance(arch, Architecture)
                        and module.native_rows
                        and arch.modules[target].rows == "swap_halves"
                    ):
                        half = dense.shape[0] // 2
                        dense = torch.cat([dense[half:], dense[:half]])
                    pieces = {target: dense}
                else:
                    group = arch.fused[arch.modules[module.targets[0]].fused]
                    rows = group.row_sizes(tensors["down"].shape[1], dense.shape[0], module.targets)
                    pieces = dict(zip(module.targets, torch.split(dense, rows), strict=True))
                for target, value in pieces.items():
                    key = target + suffix
                    out[key] = out[key] + value if key in out else value
    return out


def assert_same_deltas(a, b, rtol: float = 0.0, atol: float = 0.0, allow_zero_missing: bool = True) -> None:
    da, db = deltas(a), deltas(b)
    for key in set(da) ^ set(db):
        extra = da.get(key, db.get(key))
        assert allow_zero_missing and not bool(extra.any()), f"{key} only in one file and not zero"
    for key in set(da) & set(db):
        torch.testing.assert_close(da[key], db[key], rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}")
