"""loratool: inspect, convert, merge and extract LoRA adapters with bounded memory."""

__version__ = "0.1.0"

from .api import convert, inspect, load_adapter

__all__ = ["__version__", "convert", "inspect", "load_adapter"]
