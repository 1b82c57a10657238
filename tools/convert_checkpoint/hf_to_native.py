"""Checkpoint conversion: see `python tools/convert_checkpoint/hf_to_native.py --help`."""

from tpusft.conversion.cli import hf_to_native_main, reuse_freed_memory
from tpusft.errors import run_cli

if __name__ == "__main__":
    reuse_freed_memory()
    run_cli(hf_to_native_main)
