"""What merge needs beside its walk: LoRA modules matched to base tensors (match.py), the output
that mirrors the base (output.py) and the streamed update of each tensor (walk.py)."""
