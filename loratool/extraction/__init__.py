"""What extract needs beside its walk: which modules to extract and where they lie in both
checkpoints (targets.py), and reading both in step (reading.py)."""
