"""Checkpoint conversion: see `python tools/convert_checkpoint/hf_to_native.py --help`."""

from tpusft.checkpoint.cli import hf_to_native_main
from tpusft.errors import run_cli

if __name__ == "__main__":
    run_cli(hf_to_native_main)
