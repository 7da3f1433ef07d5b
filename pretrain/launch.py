"""`llammlein-train`: runs pretrain/tinyllama_fabric.py as the script it is (`__main__`), so that --help and flag
errors answer before torch and Lightning are imported, exactly as `python pretrain/tinyllama_fabric.py` does."""
import runpy
from pathlib import Path


def main() -> None:
    runpy.run_path(str(Path(__file__).with_name("tinyllama_fabric.py")), run_name="__main__")
