"""How long `merge` takes, and how much memory, relative to a plain safetensors read + write of the base.

    python benchmarks/merge.py [--device cpu|cuda] [--repeat 4] [--keep DIR] [--out DIR] [--tiny] [--no-peft]

Builds two bases with full-size shapes, then times each contender in its own process (so peak RSS
is that contender's alone) with a warm page cache:
- LLM: a 1.1B-parameter bf16 Llama (TinyLlama's shapes) saved as an HF model dir, and a rank-32
  PEFT adapter on every linear layer (q, k, v, o, gate, up, down). Contenders: safetensors
  `load_file` + `save_file` of model.safetensors (the baseline), `loratool merge`, and PEFT
  (`from_pretrained` + `PeftModel.from_pretrained` + `merge_and_unload` + `save_pretrained`).
- SD1.5: an SD1.5-size fp16 single file (real LDM/CLIP keys and shapes from loratool's tables, VAE
  bytes as filler) and a rank-32 kohya LoRA on the UNet's attention (to_q/k/v/out).
Prints times, peak RSS and the ratios; the baseline is measured in the same run. Dirty pages are
flushed (`sync`) before each contender starts. Contenders take turns, one run each per round
(`--repeat` rounds); the ratio is the median over rounds of loratool / baseline in the same round,
so a slow spell of the disk hits both. Both include an fsync of their output (a merge is durable
before it is renamed into place, so the baseline is a copy made durable too). `--out /dev/shm` writes every output to
memory, which takes a noisy disk out of the comparison. `--tiny` shrinks everything for a smoke test
(its numbers mean nothing).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path, and benchmarks/inspect.py would
# shadow the standard library's `inspect` module that torch imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from loratool.archs import get_architecture  # noqa: E402
from loratool.io.writer import SafetensorsWriter, TensorSpec  # noqa: E402

LLAMA = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22}
LLAMA_TINY = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2}
HEADS, KV_HEADS, RANK = 32, 4, 32
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _fill(specs: list[TensorSpec], path: Path, metadata: dict[str, str], scale: float = 0.02) -> None:
    """Write random tensors one at a time (the generator stays small whatever the file size)."""
    gen = torch.Generator().manual_seed(0)
    with SafetensorsWriter(path, specs, metadata) as writer:
        for spec in specs:
            dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[spec.dtype]
            if spec.shape == ():
                writer.write(spec.name, torch.tensor(RANK / 2, dtype=dtype))
            else:
                writer.write(spec.name, (torch.randn(spec.shape, generator=gen) * scale).to(dtype))


def build_llama(work: Path, dims: dict[str, int]) -> tuple[Path, Path]:
    base, adapter = work / "llama", work / "llama_adapter"
    base.mkdir(exist_ok=True)
    adapter.mkdir(exist_ok=True)
    h, inter, heads = dims["hidden_size"], dims["intermediate_size"], min(HEADS, dims["hidden_size"] // 16)
    kv = h * KV_HEADS // heads
    shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h)}
    shapes |= {"gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    specs = [TensorSpec("model.embed_tokens.weight", "BF16", (dims["vocab_size"], h))]
    lora = []
    for i in range(dims["num_hidden_layers"]):
        for name in LINEAR:
            group = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            path = f"model.layers.{i}.{group}.{name}"
            specs.append(TensorSpec(f"{path}.weight", "BF16", shapes[name]))
            out, inp = shapes[name]
            lora += [
                TensorSpec(f"base_model.model.{path}.lora_A.weight", "BF16", (RANK, inp)),
                TensorSpec(f"base_model.model.{path}.lora_B.weight", "BF16", (out, RANK)),
            ]
        specs += [
            TensorSpec(f"model.layers.{i}.{n}.weight", "BF16", (h,))
            for n in ("input_layernorm", "post_attention_layernorm")
        ]
    specs += [
        TensorSpec("model.norm.weight", "BF16", (h,)),
        TensorSpec("lm_head.weight", "BF16", (dims["vocab_size"], h)),
    ]
    _fill(specs, base / "model.safetensors", {"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_attention_heads": heads,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
        **dims,
    }
    (base / "config.json").write_text(json.dumps(config, indent=2))
    _fill(lora, adapter / "adapter_model.safetensors", {"format": "pt"}, scale=0.01)
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": RANK * 2,
        "target_modules": list(LINEAR),
        "base_model_name_or_path": str(base),
    }
    (adapter / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
    return base, adapter


def build_sd15(work: Path, tiny: bool) -> tuple[Path, Path]:
    """Every SD1 table module at full size (or 1/8 width with --tiny), biases, and VAE filler bytes."""
    arch = get_architecture("sd1")
    div = 8 if tiny else 1

    def shrink(shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(max(1, d // div) if i < 2 else d for i, d in enumerate(shape))

    specs, lora = [], []
    for spec in arch.modules.values():
        if spec.native is None:
            continue
        prefix = arch.components[spec.component].file_prefixes[0]
        shape = shrink(spec.shape)
        specs += [
            TensorSpec(prefix + spec.native_weight, "F16", shape),
            TensorSpec(prefix + spec.native + ".bias", "F16", shape[:1]),
        ]
        leaf = spec.path.rsplit(".", 2)
        is_attention = spec.component == "unet" and ("attn1" in leaf or "attn2" in leaf) and spec.type == "linear"
        if is_attention:
            name = arch.kohya_name(spec.name)
            lora += [
                TensorSpec(f"{name}.lora_down.weight", "F16", (RANK, shape[1])),
                TensorSpec(f"{name}.lora_up.weight", "F16", (shape[0], RANK)),
                TensorSpec(f"{name}.alpha", "F16", ()),
            ]
    filler = (84_000_000 if not tiny else 84_000) // 4
    specs += [TensorSpec(f"first_stage_model.filler.{i}", "F16", (filler,)) for i in range(4)]
    base, adapter = work / "sd15.safetensors", work / "sd15_attention_lora.safetensors"
    _fill(specs, base, {"modelspec.architecture": "stable-diffusion-v1"})
    _fill(
        lora,
        adapter,
        {"ss_network_dim": str(RANK), "ss_network_alpha": str(RANK // 2), "ss_base_model_version": "sd_v1"},
        0.01,
    )
    return base, adapter


def worker(kind: str, args: list[str]) -> None:
    """One contender in this process; prints its time and peak RSS as JSON. Imports happen before
    the clock starts, so every contender is timed on its work alone."""
    if kind == "copy":
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        start = time.perf_counter()
        with safe_open(args[0], "pt") as f:
            metadata = f.metadata()
        save_file(load_file(args[0]), args[1], metadata)
        with open(args[1], "rb") as written:  # as durable as merge's output before its rename
            os.fsync(written.fileno())
    elif kind == "loratool":
        from loratool import merge

        start = time.perf_counter()
        merge(args[0], [args[1]], args[2], device=args[3], force=True)
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(args[0], dtype=torch.bfloat16)
        merged = PeftModel.from_pretrained(model, args[1]).merge_and_unload()
        merged.save_pretrained(args[2])
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's own peak RSS. getrusage's ru_maxrss would count the parent's RSS at fork
    (it survives execve); VmHWM belongs to the fresh address space."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; an upper bound


def run_once(kind: str, *args: str) -> dict[str, float]:
    for leftover in args[2:3]:
        p = Path(leftover)
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    os.sync()  # no contender pays for the write-back of another's output
    done = subprocess.run(
        [sys.executable, __file__, "--worker", kind, *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_rounds(contenders: dict[str, tuple[str, ...]], repeat: int) -> tuple[dict[str, dict[str, float]], list[float]]:
    """Run every contender once per round, in turn, so a slow spell of the disk hits all of them.
    Returns each contender's best time and highest peak RSS, and per round loratool's time / the
    baseline's time in that round."""
    best = {name: {"seconds": math.inf, "peak_rss_mb": 0.0} for name in contenders}
    ratios = []
    for _ in range(repeat):
        this_round = {name: run_once(name, *args) for name, args in contenders.items()}
        for name, result in this_round.items():
            best[name] = {
                "seconds": min(best[name]["seconds"], result["seconds"]),
                "peak_rss_mb": max(best[name]["peak_rss_mb"], result["peak_rss_mb"]),
            }
        ratios.append(this_round["loratool"]["seconds"] / this_round["copy"]["seconds"])
    return best, ratios


def warm(path: Path) -> None:
    files = [path] if path.is_file() else sorted(path.rglob("*.safetensors"))
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def report(
    title: str, base_bytes: int, results: dict[str, dict[str, float]], ratios: list[float], target: float
) -> None:
    copy, ours, peft = results["copy"], results["loratool"], results.get("peft")
    print(f"{title}: base {base_bytes / 2**30:.2f} GiB")
    print(f"  load_file + save_file + fsync: {copy['seconds']:.2f} s, peak RSS {copy['peak_rss_mb']:.0f} MB")
    print(f"  loratool merge:                    {ours['seconds']:.2f} s, peak RSS {ours['peak_rss_mb']:.0f} MB")
    if peft is not None:
        print(f"  PEFT merge_and_unload + save:      {peft['seconds']:.2f} s, peak RSS {peft['peak_rss_mb']:.0f} MB")
    print(
        f"  ratio merge / read+write: {statistics.median(ratios):.2f}x median of rounds "
        f"({', '.join(f'{r:.2f}' for r in ratios)}), {ours['seconds'] / copy['seconds']:.2f}x best / best "
        f"(target <= {target}x); "
        f"peak RSS {ours['peak_rss_mb']:.0f} MB (target <= 600 MB)"
        + (f"; PEFT / merge: {peft['seconds'] / ours['seconds']:.2f}x time" if peft else "")
    )


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--keep", type=Path, help="work in this directory instead of a temporary one")
    parser.add_argument("--tiny", action="store_true", help="small shapes, for a smoke test")
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT run")
    parser.add_argument(
        "--out", type=Path, help="where contenders write (e.g. /dev/shm, to take a noisy disk out of the comparison)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        out = args.out or work
        base, adapter = build_llama(work, LLAMA_TINY if args.tiny else LLAMA)
        warm(base)
        contenders = {
            "copy": (str(base / "model.safetensors"), str(out / "copy.safetensors")),
            "loratool": (str(base), str(adapter), str(out / "merged_llama"), args.device),
        }
        if not args.no_peft:
            contenders["peft"] = (str(base), str(adapter), str(out / "peft_llama"))
        results, ratios = run_rounds(contenders, args.repeat)
        report(
            f"LLM (rank-{RANK} all-linear PEFT adapter, bf16, --device {args.device})",
            (base / "model.safetensors").stat().st_size,
            results,
            ratios,
            1.6,
        )
        for p in (base, adapter, out / "merged_llama", out / "peft_llama", out / "copy.safetensors"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

        base, adapter = build_sd15(work, args.tiny)
        warm(base)
        contenders = {
            "copy": (str(base), str(out / "copy.safetensors")),
            "loratool": (str(base), str(adapter), str(out / "merged_sd15.safetensors"), args.device),
        }
        results, ratios = run_rounds(contenders, args.repeat)
        title = f"SD1.5 (rank-{RANK} attention kohya LoRA, fp16, --device {args.device})"
        report(title, base.stat().st_size, results, ratios, 1.3)
        for p in (base, adapter, out / "merged_sd15.safetensors", out / "copy.safetensors"):
            p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
