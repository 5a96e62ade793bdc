"""Run every example in the docs and write its real output under it, so the docs cannot drift.

An example is a block in a docs page:

    <!-- example -->
    ```console
    $ loratool inspect fixtures/kohya_sd15.safetensors
    ...output, rewritten by this script...
    ```

The `$ ` lines are the source; everything else in the block is regenerated. A page's examples run in
order in one scratch directory (so a later example can use an earlier one's output) that holds the
shipped `fixtures/` and tiny stand-ins for the checkpoints users have: `sd15.safetensors`,
`sd15_tuned.safetensors`, `sdxl_base.safetensors`, HF model dirs `llama/` and `llama_sft/`, and
`unet_lora/`, a PEFT adapter dir of an SD1.5 UNet
(built from narrow configs, seeded, in a few seconds). Commands run through bash with the installed
`loratool` first on PATH, at 80 columns, on the CPU; trailing spaces (rich pads table
cells) are dropped. `<!-- example fails -->` marks a block whose
last command is meant to exit non-zero (its error is part of the page); any other failure stops
the script.

    python docs/make_examples.py           # rewrite the pages
    python docs/make_examples.py --check   # exit 1, naming the pages, if any is stale
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(ROOT / "fixtures"))

PAGES = ("index.md", "inspect.md", "convert.md", "merge.md", "combine.md", "extract.md", "resize.md", "cookbook.md")
BLOCK = re.compile(r"<!-- example( fails)? -->\n```console\n(.*?)```", re.S)
ENV = {
    "COLUMNS": "80",
    "LINES": "50",
    "TERM": "dumb",
    "CUDA_VISIBLE_DEVICES": "",  # the same output on a machine with a GPU
    "PYTHONHASHSEED": "0",
    "LC_ALL": "C.UTF-8",
}
TUNED_RANK = 6  # the fine-tune's change is low rank plus noise, as real fine-tunes nearly are


def _tuned(weights: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A fine-tune of `weights`: every matrix moves by a rank-6 change (about 5% of its norm) plus
    a little noise; everything else is unchanged."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, w in weights.items():
        if w.ndim < 2 or w.shape[0] < 8 or "embed" in key:
            out[key] = w
            continue
        matrix = w.flatten(1).float()
        rows, cols = matrix.shape
        change = torch.randn(rows, TUNED_RANK, generator=g) @ torch.randn(TUNED_RANK, cols, generator=g)
        change *= 0.05 * matrix.norm() / change.norm()
        change += 1e-4 * matrix.norm() / (rows * cols) ** 0.5 * torch.randn(rows, cols, generator=g)
        out[key] = (matrix + change).reshape(w.shape).to(w.dtype).contiguous()
    return out


def build_stand_ins(into: Path) -> None:
    """The checkpoints the examples name, at toy size."""
    from tiny_models import clip_config, clip_text_model, llama, sd15_unet, sdxl_unet, single_file
    from transformers import CLIPTextModelWithProjection
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

    from loratool.archs import get_architecture

    sd15 = single_file(get_architecture("sd1"), {"unet": sd15_unet(), "text_encoder": clip_text_model()})
    save_file(sd15, into / "sd15.safetensors")
    save_file(_tuned(sd15, 1), into / "sd15_tuned.safetensors")
    torch.manual_seed(0)
    sdxl = single_file(
        get_architecture("sdxl"),
        {
            "unet": sdxl_unet(),
            "text_encoder": clip_text_model(),
            "text_encoder_2": CLIPTextModelWithProjection(clip_config()),
        },
    )
    save_file({k: v.half() for k, v in sdxl.items()}, into / "sdxl_base.safetensors")
    _peft_unet_adapter(into / "unet_lora")
    model = llama()
    model.save_pretrained(into / "llama")
    model.save_pretrained(into / "llama_sft")
    weights = into / "llama_sft" / "model.safetensors"
    save_file(_tuned(load_file(weights), 2), weights, metadata={"format": "pt"})
    for directory in ("llama", "llama_sft"):  # only what loratool reads: weights and config
        for extra in (into / directory).iterdir():
            if extra.name not in ("model.safetensors", "config.json"):
                extra.unlink()
        config = json.loads((into / directory / "config.json").read_text())
        config.pop("transformers_version", None)  # the same files whatever transformers wrote them
        (into / directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def _peft_unet_adapter(directory: Path) -> None:
    """What a diffusers + PEFT training script saves for an SD1.5 UNet: a PEFT adapter dir (here
    with random factors, where training would have made them)."""
    from peft import LoraConfig, get_peft_model
    from tiny_models import sd15_unet

    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    torch.manual_seed(0)
    model = get_peft_model(sd15_unet(), LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    model.save_pretrained(directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    for key in ("peft_version", "base_model_name_or_path"):  # the same bytes whatever PEFT wrote them
        config.pop(key, None)
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (directory / "README.md").unlink(missing_ok=True)


def run_block(commands: list[str], workspace: Path, fails: bool, where: str) -> str:
    env = {**os.environ, **ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = []
    for i, command in enumerate(commands):
        result = subprocess.run(
            ["bash", "-c", command],
            cwd=workspace,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
        )
        expect_failure = fails and i == len(commands) - 1
        if (result.returncode != 0) != expect_failure:
            raise SystemExit(f"{where}: `{command}` exited {result.returncode}:\n{result.stdout}")
        printed = "".join(line.rstrip() + "\n" for line in result.stdout.splitlines())
        out.append(f"$ {command}\n{printed}")
    return "".join(out)


def render_page(name: str, text: str, stand_ins: Path) -> str:
    with tempfile.TemporaryDirectory(prefix="loratool-docs-") as scratch:
        workspace = Path(scratch)
        shutil.copytree(stand_ins, workspace, dirs_exist_ok=True)
        (workspace / "fixtures").symlink_to(ROOT / "fixtures")

        def fill(match: re.Match) -> str:
            commands = [line[2:] for line in match.group(2).splitlines() if line.startswith("$ ")]
            if not commands:
                raise SystemExit(f"{name}: an example block has no `$ ` command line")
            output = run_block(commands, workspace, bool(match.group(1)), name)
            return f"<!-- example{match.group(1) or ''} -->\n```console\n{output}```"

        return BLOCK.sub(fill, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if any page is stale; write nothing")
    parser.add_argument("pages", nargs="*", default=list(PAGES), help="pages to run (default: all)")
    args = parser.parse_args()
    stale = []
    with tempfile.TemporaryDirectory(prefix="loratool-stand-ins-") as built:
        stand_ins = Path(built)
        build_stand_ins(stand_ins)
        for name in args.pages:
            path = DOCS / name
            text = path.read_text(encoding="utf-8")
            rendered = render_page(name, text, stand_ins)
            if rendered != text:
                stale.append(name)
                if not args.check:
                    path.write_text(rendered, encoding="utf-8")
    if args.check and stale:
        print(f"stale examples in {', '.join(stale)}: run python docs/make_examples.py", file=sys.stderr)
        return 1
    if not args.check:
        print(f"rewrote {', '.join(stale) or 'nothing (all current)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
