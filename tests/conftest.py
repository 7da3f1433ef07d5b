import sys
from pathlib import Path

# Make `lit_gpt`, `scripts` and `pretrain` importable from the repo root without installing anything.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
