"""How long `convert` takes on a ~1 GB LoRA, relative to a plain safetensors read + write of it.

    python benchmarks/convert.py [--size-mb 1024] [--repeat 2] [--keep DIR]

Builds two kohya LoRAs with real module names and full-size shapes from loratool's tables (bf16
factors): an SDXL one (kohya -> diffusers is pure renaming, every tensor copied byte for byte) and
a Flux.1 one (kohya -> diffusers splits every fused qkv/linear1 module, so ups are sliced and
downs written once per part). For each, times in the same run with a warm page cache:
`safetensors.torch.load_file` + `save_file` of the file (the baseline) and `loratool convert --to
diffusers`. Prints the ratios; the baseline is measured here, so they compare on any machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path, and benchmarks/inspect.py would
# shadow the standard library's `inspect` module that torch imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from loratool.archs import Architecture, get_architecture, kohya_flat  # noqa: E402
from loratool.commands.convert import convert  # noqa: E402
from loratool.io.writer import SafetensorsWriter, TensorSpec  # noqa: E402


def kohya_modules(arch: Architecture) -> list[tuple[str, tuple[int, ...]]]:
    """(kohya name, full-size weight shape) of every default-target module kohya names itself,
    fused weights (Flux qkv, linear1) as one module."""
    out = []
    for spec in arch.modules.values():
        if spec.target == "default" and spec.type == "linear" and spec.native is not None:
            out.append((arch.kohya_name(spec.name), spec.shape))
    for group in arch.fused.values():
        parts = [arch.modules[p] for p in group.parts]
        if arch.components[group.component].kohya[0].paths == "native" and parts[0].target == "default":
            naming = arch.components[group.component].kohya[0]
            rows = sum(p.shape[0] for p in parts)
            out.append((naming.prefix + kohya_flat(group.native), (rows, parts[0].shape[1])))
    return out


def build_lora(path: Path, arch_name: str, size_mb: float) -> int:
    arch = get_architecture(arch_name)
    modules = kohya_modules(arch)
    per_rank = sum(2 * (shape[0] + shape[1]) for _, shape in modules)  # bf16 bytes per unit of rank
    rank = max(1, round(size_mb * 2**20 / per_rank))
    specs = []
    for name, (rows, cols) in modules:
        specs += [
            TensorSpec(f"{name}.lora_down.weight", "BF16", (rank, cols)),
            TensorSpec(f"{name}.lora_up.weight", "BF16", (rows, rank)),
            TensorSpec(f"{name}.alpha", "BF16", ()),
        ]
    gen = torch.Generator().manual_seed(0)
    meta = {"ss_network_dim": str(rank), "ss_network_alpha": str(rank // 2), "ss_base_model_version": arch_name}
    with SafetensorsWriter(path, specs, meta) as writer:
        for spec in specs:
            if spec.shape == ():
                tensor = torch.tensor(rank // 2, dtype=torch.bfloat16)
            else:
                tensor = (torch.randn(spec.shape, generator=gen) * 0.05).to(torch.bfloat16)
            writer.write(spec.name, tensor)
    return rank


def timed(fn, repeat: int) -> float:
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=1024)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="work in this directory instead of a temporary one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        for arch_name in ("sdxl", "flux1"):
            src = work / f"bench_{arch_name}_kohya.safetensors"
            rank = build_lora(src, arch_name, args.size_mb)
            copy, out = work / "copy.safetensors", work / "out.safetensors"
            load_file(src)  # warm the page cache
            convert(src, "diffusers", out, force=True)  # and load the architecture tables once

            def baseline(src=src, copy=copy) -> None:
                save_file(load_file(src), copy)

            def ours(src=src, out=out) -> None:
                convert(src, "diffusers", out, force=True)

            base_s = timed(baseline, args.repeat)
            ours_s = timed(ours, args.repeat)
            size = src.stat().st_size / 2**20
            print(
                f"{arch_name}: {size:.0f} MiB kohya LoRA (rank {rank}) -> diffusers: {ours_s:.2f} s; "
                f"safetensors load_file + save_file {base_s:.2f} s; ratio {ours_s / base_s:.2f}x (target <= 1.5x)"
            )
            for p in (src, copy, out):
                p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
