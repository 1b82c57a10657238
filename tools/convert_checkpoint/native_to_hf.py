"""Checkpoint conversion: see `python tools/convert_checkpoint/native_to_hf.py --help`."""

from tpusft.conversion.cli import native_to_hf_main, reuse_freed_memory
from tpusft.errors import run_cli

if __name__ == "__main__":
    reuse_freed_memory()
    run_cli(native_to_hf_main)
