"""loratool: inspect, convert, merge and extract LoRA adapters with bounded memory."""

__version__ = "0.1.0"

from .api import combine, convert, extract, inspect, load_adapter, merge, resize

__all__ = ["__version__", "combine", "convert", "extract", "inspect", "load_adapter", "merge", "resize"]
