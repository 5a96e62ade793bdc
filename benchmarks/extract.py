"""How fast `extract` is, against full SVDs and against reading the checkpoints once.

    python benchmarks/extract.py [--device cpu|cuda] [--rank 16] [--keep DIR] [--tiny]
                                 [--skip-svd] [--skip-model] [--skip-exact]

1. SVD: a 4096x4096 and an 11008x4096 delta (a decaying rank-128 change plus dense noise, as a
   fine-tune's delta looks), cut to rank 16 by `torch.linalg.svd` (what kohya, mergekit, LyCORIS and
   ComfyUI run per layer) and by loratool's randomized SVD. Prints the time ratio and the ratio of
   their Frobenius errors (1.0 = optimal).
2. Model: a synthetic 1.1B-parameter bf16 pair with TinyLlama's shapes (tuned = base + a rank-8
   change + noise on every linear layer) saved as HF dirs. Contenders, each in its own process with
   a warm page cache (peak RSS is that process's own VmHWM): a plain read of every byte of both
   checkpoints (the baseline: reading both once), `loratool extract --rank 16` (PEFT output),
   `loratool extract --exact` (the same pipeline with a full SVD per module, as kohya, mergekit and
   LyCORIS run: the end-to-end baseline for the speed-up; each module's error is then measured
   from both written adapters) and `mergekit-extract-lora` when that command is installed.
`--tiny` shrinks everything for a smoke test (its numbers mean nothing).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path, and benchmarks/inspect.py would
# shadow the standard library's `inspect` module that torch imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from loratool.io.safetensors_file import SafetensorsFile  # noqa: E402
from loratool.io.writer import SafetensorsWriter, TensorSpec  # noqa: E402
from loratool.ops.svd import balanced_factors, randomized_svd  # noqa: E402


def _sibling(name: str):
    """benchmarks/ is not a package (and must stay off sys.path), so siblings load by path."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- 1. one delta, two SVDs --------------------------------------------------------------------------
def synthetic_delta(m: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = min(128, m, n)
    decay = torch.arange(1, k + 1, dtype=torch.float32) ** -1.0
    change = (torch.randn(m, k, generator=g) * decay) @ torch.randn(k, n, generator=g) / n**0.5
    return change + 2e-3 * torch.randn(m, n, generator=g)


def frobenius_error(matrix: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    return float((matrix - up @ down).norm())


def svd_bench(shape: tuple[int, int], rank: int, device: torch.device) -> dict[str, float]:
    matrix = synthetic_delta(*shape).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    randomized_svd(matrix[:256, :256].contiguous(), rank, seed=0)  # warm-up (kernels, threads)
    sync()
    start = time.perf_counter()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    sync()
    full_seconds = time.perf_counter() - start
    full_error = frobenius_error(matrix, u[:, :rank] * s[:rank], vh[:rank])
    del u, s, vh
    start = time.perf_counter()
    t = randomized_svd(matrix, rank, seed=0)
    up, down = balanced_factors(t, rank)
    sync()
    ours_seconds = time.perf_counter() - start
    ours_error = frobenius_error(matrix, up, down)
    return {"full": full_seconds, "ours": ours_seconds, "error_ratio": ours_error / full_error, "sweeps": t.sweeps}


# -- 2. a whole model --------------------------------------------------------------------------------
def build_pair(work: Path, dims: dict[str, int]) -> tuple[Path, Path]:
    """The merge benchmark's 1.1B bf16 Llama as base; tuned streamed from it one tensor at a time."""
    merge_bench = _sibling("merge")
    base, _ = merge_bench.build_llama(work, dims)
    tuned = work / "llama_tuned"
    tuned.mkdir(exist_ok=True)
    shutil.copy(base / "config.json", tuned / "config.json")
    g = torch.Generator().manual_seed(1)
    with SafetensorsFile(base / "model.safetensors") as src:
        specs = [TensorSpec(k, src.info(k).dtype, src.info(k).shape) for k in src]
        with SafetensorsWriter(tuned / "model.safetensors", specs, dict(src.metadata)) as writer:
            for key in src:
                weight = src.load(key)
                if key.endswith("_proj.weight"):
                    out_f, in_f = weight.shape
                    change = torch.randn(out_f, 8, generator=g) @ torch.randn(8, in_f, generator=g) * 2e-3
                    noise = torch.randn(out_f, in_f, generator=g) * 1e-4
                    weight = (weight.float() + change + noise).to(weight.dtype)
                writer.write(key, weight)
    return base, tuned


def worker(kind: str, args: list[str]) -> None:
    """One contender in this process; prints its time and peak RSS as JSON."""
    if kind == "read":
        buffer = bytearray(64 << 20)
        start = time.perf_counter()
        for path in args:  # every byte once, into one reused buffer: the least any reader can do
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass
    elif kind in ("loratool", "exact"):
        from loratool import extract

        start = time.perf_counter()
        extract(args[0], args[1], args[2], rank=int(args[3]), device=args[4], exact=kind == "exact", force=True)
    else:
        start = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    own = _sibling("merge").peak_rss_mb()
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux: mergekit's process
    print(json.dumps({"seconds": seconds, "peak_rss_mb": max(own, child)}))


def measured_errors(base: Path, tuned: Path, extracted: Path, device: torch.device) -> dict[str, float]:
    """||(tuned - base) - scale * B @ A||_F per module, measured from the written adapter (not the
    extractor's own estimate)."""
    from loratool import load_adapter

    errors = {}
    with (
        SafetensorsFile(base / "model.safetensors") as b,
        SafetensorsFile(tuned / "model.safetensors") as t,
        load_adapter(extracted) as adapter,
    ):
        for module in adapter.modules.values():
            key = module.targets[0] + ".weight"
            delta = t.load(key).to(device, torch.float32) - b.load(key).to(device, torch.float32)
            factors = adapter.tensors(module)
            up, down = factors["up"].to(device, torch.float32), factors["down"].to(device, torch.float32)
            errors[key] = float((delta - module.scale * up @ down).norm())
    return errors


def run(kind: str, *args: str) -> dict[str, float]:
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
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--keep", type=Path, help="work in this directory instead of a temporary one")
    parser.add_argument("--tiny", action="store_true", help="small shapes, for a smoke test")
    parser.add_argument("--skip-svd", action="store_true")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--skip-exact", action="store_true", help="skip the full-SVD extract (minutes on a CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if not args.skip_svd:
        for shape in [(256, 256), (688, 256)] if args.tiny else [(4096, 4096), (11008, 4096)]:
            r = svd_bench(shape, args.rank, device)
            print(
                f"SVD {shape[0]}x{shape[1]} rank {args.rank} ({device}): torch.linalg.svd {r['full']:.2f} s, "
                f"loratool {r['ours']:.3f} s ({r['sweeps']} power sweeps): {r['full'] / r['ours']:.0f}x faster "
                f"(target >= 30x), error {r['error_ratio']:.5f}x the optimum (target <= 1.001x)"
            )
    if args.skip_model:
        return
    merge_bench = _sibling("merge")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        base, tuned = build_pair(work, merge_bench.LLAMA_TINY if args.tiny else merge_bench.LLAMA)
        for d in (base, tuned):
            merge_bench.warm(d)
        files = [str(base / "model.safetensors"), str(tuned / "model.safetensors")]
        read = run("read", *files)
        ours = run("loratool", str(base), str(tuned), str(work / "extracted"), str(args.rank), args.device)
        size = sum(Path(f).stat().st_size for f in files) / 2**30
        print(f"model pair: 2 x {size / 2:.2f} GiB bf16, rank {args.rank}, --device {args.device}")
        print(f"  plain read of both files:      {read['seconds']:.2f} s, peak RSS {read['peak_rss_mb']:.0f} MB")
        print(f"  loratool extract:              {ours['seconds']:.2f} s, peak RSS {ours['peak_rss_mb']:.0f} MB")
        if not args.skip_exact:
            exact = run("exact", str(base), str(tuned), str(work / "exact"), str(args.rank), args.device)
            print(
                f"  loratool extract --exact (a full SVD per module, as peers run): {exact['seconds']:.2f} s, "
                f"peak RSS {exact['peak_rss_mb']:.0f} MB"
            )
            ours_err = measured_errors(base, tuned, work / "extracted", device)
            best_err = measured_errors(base, tuned, work / "exact", device)
            ratios = [ours_err[k] / best_err[k] for k in best_err if best_err[k] > 0]
            print(
                f"  full SVD / loratool: {exact['seconds'] / ours['seconds']:.1f}x faster end to end (target >= 30x); "
                f"measured error / the full SVD's, per module: worst {max(ratios):.5f}x, median "
                f"{sorted(ratios)[len(ratios) // 2]:.5f}x over {len(ratios)} modules (target <= 1.001x)"
            )
        mergekit = shutil.which("mergekit-extract-lora")
        if mergekit is not None:
            out = work / "mergekit_out"
            theirs = run(
                "mergekit",
                mergekit,
                "--model",
                str(tuned),
                "--base-model",
                str(base),
                "--out-path",
                str(out),
                "--max-rank",
                str(args.rank),
                *(["--cuda"] if device.type == "cuda" else []),
            )
            print(
                f"  mergekit-extract-lora:         {theirs['seconds']:.2f} s, peak RSS {theirs['peak_rss_mb']:.0f} MB"
            )
        else:
            print("  mergekit-extract-lora: not installed, not timed")
        print(
            f"  ratio extract / read both: {ours['seconds'] / read['seconds']:.2f}x (target <= 2x); "
            f"peak RSS {ours['peak_rss_mb']:.0f} MB (target <= 1024 MB)"
        )


if __name__ == "__main__":
    main()
