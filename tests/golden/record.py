"""Record the golden corpus: run every case of golden_cases.py and write golden.json.

    python tests/golden/record.py

Only for a change of behaviour that is meant: the golden corpus exists to show that a reshaping of
the code changed nothing, so rerecording it is a decision to state in the commit message.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from golden_cases import GOLDEN, run_all


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        record = run_all(Path(tmp))
    GOLDEN.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"{GOLDEN}: {len(record['cases'])} cases, {len(record['inputs'])} inputs")


if __name__ == "__main__":
    main()
