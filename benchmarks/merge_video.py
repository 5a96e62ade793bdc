"""merge into a 14B-class video model (Wan 2.1 T2V 14B's shapes, about 28 GB in bf16), against a
plain streamed read + write of the same file, with peak RSS.

    python benchmarks/merge_video.py [--device cpu|cuda] [--repeat 1] [--keep DIR] [--out DIR] [--tiny]

(`--keep DIR` keeps the base and the LoRA there, and a later run with the same DIR reuses them.)

Builds the base from loratool's `wan2.1-t2v-14b` table (every module at full size, biases, norms,
the per-block modulation parameters), written one tensor at a time, and a rank-32 musubi-tuner LoRA
(`lora_unet_blocks_N_...`) on every attention and feed-forward Linear of the 40 blocks. The base is
larger than this machine's page cache and memory, so load_file + save_file (benchmarks/merge.py's
baseline) cannot run at all: the baseline here copies the file in 64 MiB chunks and fsyncs it, the
least any tool can do to produce a file of that size. Each contender runs in its own process (peak
RSS is its own), taking turns per round; the ratio is the median over rounds of merge / copy in the
same round. `--tiny` shrinks the widths for a smoke test (its numbers mean nothing).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path, and benchmarks/inspect.py would
# shadow the standard library's `inspect` module that torch imports.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from loratool.archs import get_architecture  # noqa: E402
from loratool.io.writer import SafetensorsWriter, TensorSpec  # noqa: E402

RANK = 32
ARCH = "wan2.1-t2v-14b"
CHUNK = 64 << 20


def build(work: Path, tiny: bool) -> tuple[Path, Path]:
    """The base (every table module, its bias, and each block's modulation) and the LoRA."""
    arch = get_architecture(ARCH)
    div = 16 if tiny else 1

    def shrink(shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(max(1, d // div) if i < 2 else d for i, d in enumerate(shape))

    specs, lora = [], []
    blocks = set()
    for spec in arch.modules.values():
        shape = shrink(spec.shape)
        specs.append(TensorSpec(spec.native_weight, "BF16", shape))
        if spec.type != "norm":
            specs.append(TensorSpec(spec.native + ".bias", "BF16", shape[:1]))
        if spec.path.startswith("blocks."):
            blocks.add(spec.native.split(".")[1])
        if spec.target == "default" and spec.type == "linear":
            name = arch.kohya_name(spec.name)
            lora += [
                TensorSpec(f"{name}.lora_down.weight", "BF16", (RANK, shape[1])),
                TensorSpec(f"{name}.lora_up.weight", "BF16", (shape[0], RANK)),
                TensorSpec(f"{name}.alpha", "BF16", ()),
            ]
    width = shrink(arch.modules["transformer.blocks.0.attn1.to_q"].shape)[0]
    specs += [TensorSpec(f"blocks.{i}.modulation", "F32", (1, 6, width)) for i in sorted(blocks, key=int)]
    base, adapter = work / "wan14b.safetensors", work / "wan14b_lora.safetensors"
    _fill(specs, base, {"modelspec.architecture": "wan2.1-t2v-14b"}, 0.02)
    _fill(lora, adapter, {"ss_network_dim": str(RANK), "ss_base_model_version": "wan"}, 0.01)
    return base, adapter


def _fill(specs: list[TensorSpec], path: Path, metadata: dict[str, str], scale: float) -> None:
    """Random tensors written one at a time: the generator's memory stays one tensor whatever the file."""
    gen = torch.Generator().manual_seed(0)
    with SafetensorsWriter(path, specs, metadata) as writer:
        for spec in specs:
            dtype = {"BF16": torch.bfloat16, "F32": torch.float32}[spec.dtype]
            if spec.shape == ():
                writer.write(spec.name, torch.tensor(RANK / 2, dtype=dtype))
            else:
                writer.write(spec.name, (torch.randn(spec.shape, generator=gen) * scale).to(dtype))


def worker(kind: str, args: list[str]) -> None:
    """One contender in this process; prints its time and peak RSS as JSON."""
    if kind == "copy":
        start = time.perf_counter()
        with open(args[0], "rb") as src, open(args[1], "wb") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
    else:
        from loratool import merge

        start = time.perf_counter()
        merge(args[0], [args[1]], args[2], device=args[3], force=True)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mb": _peak_rss_mb()}))


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("no VmHWM in /proc/self/status")


def run_once(kind: str, outputs: list[Path], *args: str) -> dict[str, float]:
    """One contender's run, after every contender's output is removed (two copies of a 28 GB base
    beside the base itself would not fit on this machine's disk)."""
    for path in outputs:
        path.unlink(missing_ok=True)
    os.sync()
    done = subprocess.run(
        [sys.executable, __file__, "--worker", kind, *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="work in this directory instead of a temporary one")
    parser.add_argument("--out", type=Path, help="where contenders write")
    parser.add_argument("--tiny", action="store_true", help="small shapes, for a smoke test")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        out = args.out or work
        started = time.perf_counter()
        base, adapter = work / "wan14b.safetensors", work / "wan14b_lora.safetensors"
        if args.keep and base.exists() and adapter.exists():  # a base built by an earlier run (3 min)
            print(f"reusing {base} ({base.stat().st_size / 2**30:.2f} GiB)")
        else:
            base, adapter = build(work, args.tiny)
            print(f"built {base.stat().st_size / 2**30:.2f} GiB base in {time.perf_counter() - started:.0f} s")
        outputs = [out / "copy.safetensors", out / "merged.safetensors"]
        contenders = {
            "copy": (str(base), str(outputs[0])),
            "loratool": (str(base), str(adapter), str(outputs[1]), args.device),
        }
        best = {name: {"seconds": float("inf"), "peak_rss_mb": 0.0} for name in contenders}
        ratios = []
        for _ in range(args.repeat):
            this_round = {name: run_once(name, outputs, *a) for name, a in contenders.items()}
            for name, result in this_round.items():
                best[name]["seconds"] = min(best[name]["seconds"], result["seconds"])
                best[name]["peak_rss_mb"] = max(best[name]["peak_rss_mb"], result["peak_rss_mb"])
            ratios.append(this_round["loratool"]["seconds"] / this_round["copy"]["seconds"])
        copy, ours = best["copy"], best["loratool"]
        print(f"Wan 2.1 T2V 14B shapes (rank-{RANK} musubi LoRA, bf16, --device {args.device})")
        print(f"  streamed copy + fsync: {copy['seconds']:.1f} s, peak RSS {copy['peak_rss_mb']:.0f} MB")
        print(f"  loratool merge:        {ours['seconds']:.1f} s, peak RSS {ours['peak_rss_mb']:.0f} MB")
        print(
            f"  ratio merge / copy: {statistics.median(ratios):.2f}x median of rounds "
            f"({', '.join(f'{r:.2f}' for r in ratios)}); peak RSS {ours['peak_rss_mb']:.0f} MB (target <= 600 MB)"
        )
        for p in outputs if args.keep else [base, adapter, *outputs]:
            p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
