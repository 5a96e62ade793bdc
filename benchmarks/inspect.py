"""How long `inspect` takes on a ~200 MB LoRA, relative to reading the file once.

    python benchmarks/inspect.py [--size-mb 200] [--keep DIR]

Builds a kohya SDXL LoRA with the real module names and full-size shapes from loratool's table
(fp16 factors, every default-target module), then times, in the same run and with a warm page cache
for both: a plain read of every byte, `safetensors.torch.load_file`, and `loratool.inspect`.
Prints the ratios; the baseline is measured here, so the numbers compare on any machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path and its name would shadow the
# standard library's `inspect` module that torch imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import loratool  # noqa: E402
from loratool.archs import get_architecture  # noqa: E402
from loratool.io.writer import SafetensorsWriter, TensorSpec  # noqa: E402


def build_lora(path: Path, size_mb: float) -> int:
    arch = get_architecture("sdxl")
    modules = [m for m in arch.modules.values() if m.target == "default"]
    per_rank = sum(2 * (m.shape[0] + math.prod(m.shape[1:])) for m in modules)  # fp16 bytes per unit of rank
    rank = max(1, round(size_mb * 2**20 / per_rank))
    specs, plan = [], []
    for m in modules:
        name = arch.kohya_name(m.name)
        down_shape = (rank, *m.shape[1:]) if m.type == "linear" else (rank, m.shape[1], *m.shape[2:])
        up_shape = (m.shape[0], rank) if m.type == "linear" else (m.shape[0], rank, 1, 1)
        for suffix, shape in (("alpha", ()), ("lora_down.weight", down_shape), ("lora_up.weight", up_shape)):
            specs.append(TensorSpec(f"{name}.{suffix}", "F16", tuple(shape)))
            plan.append(shape)
    gen = torch.Generator().manual_seed(0)
    meta = {"ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2), "ss_base_model_version": "sdxl_base_v1-0"}
    with SafetensorsWriter(path, specs, meta, record_hash=True) as writer:
        for spec, shape in zip(specs, plan, strict=True):
            if shape == ():
                tensor = torch.tensor(rank / 2, dtype=torch.float16)
            else:
                tensor = (torch.randn(shape, generator=gen) * 0.05).to(torch.float16)
            writer.write(spec.name, tensor)
    return rank


def timed(fn, repeat: int) -> float:
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def read_all(path: Path) -> None:
    with open(path, "rb") as fh:
        while fh.read(16 * 2**20):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="write the LoRA here instead of a temporary directory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = (args.keep or Path(tmp)) / "bench_sdxl_lora.safetensors"
        rank = build_lora(path, args.size_mb)
        size = path.stat().st_size
        read_all(path)  # warm the page cache for every contender alike
        t_read = timed(lambda: read_all(path), args.repeat)
        t_load = timed(lambda: load_file(path), args.repeat)
        report = loratool.inspect(path)
        t_inspect = timed(lambda: loratool.inspect(path), args.repeat)
        print(
            f"file: {size / 2**20:.0f} MiB, {report.summary['modules']} modules, rank {rank}, "
            f"{len(report.findings)} findings, {torch.get_num_threads()} threads"
        )
        print(f"plain read:               {t_read:8.3f} s")
        print(f"safetensors load_file:    {t_load:8.3f} s   ({t_load / t_read:.1f}x read)")
        print(
            f"loratool inspect:         {t_inspect:8.3f} s   ({t_inspect / t_read:.1f}x read, "
            f"{t_inspect / t_load:.1f}x load_file)"
        )
        print(f"ratio inspect / read: {t_inspect / t_read:.2f}")


if __name__ == "__main__":
    main()
