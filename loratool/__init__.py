"""loratool: inspect, convert, merge and extract LoRA adapters with bounded memory."""

__version__ = "0.1.0"

from .api import *  # noqa: F403 - the public API is api.__all__
from .api import __all__ as _api

__all__ = ["__version__", *_api]
