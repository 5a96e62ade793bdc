"""What the command line's options offer, named without importing the code behind them.

`loratool --help`, every subcommand's help and shell completion build these choices on each start,
so they come from here (no torch, no tables parsed) and the modules that own each registry import
them from here too; tests/test_cli_startup.py checks each against the registry it names.
"""

from __future__ import annotations

from pathlib import Path

TARGET_LAYOUTS = ("comfyui", "diffusers", "kohya", "mlx", "peft")  # formats.LAYOUTS
DEVICE_CHOICES = ("auto", "cpu", "cuda")
DTYPE_CHOICES = ("keep", "fp32", "fp16", "bf16")  # merge's output dtypes
DEFAULT_MAX_RANK = 64  # extract --dynamic's cap
TABLES = Path(__file__).resolve().parent / "archs" / "tables"


def architecture_names() -> tuple[str, ...]:
    """The names `--arch` takes: one architecture table per file, named after it."""
    return tuple(sorted(p.stem for p in TABLES.glob("*.json")))
