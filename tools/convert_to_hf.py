#!/usr/bin/env python
"""DeepSpeed checkpoint -> HuggingFace folder; the same as the `neox-convert-hf` console script.

    python tools/convert_to_hf.py checkpoints/demo --out hf/demo --verify
"""

import sys
from pathlib import Path

# Run from a checkout without installing.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from neox_train.cli.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
