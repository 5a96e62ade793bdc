"""One codec per on-disk layout, and detection that picks between them."""

from .detect import CODECS, Detection, detect_format, read_adapter

__all__ = ["CODECS", "Detection", "detect_format", "read_adapter"]
