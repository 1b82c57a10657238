"""`python -m tpusft.data CONFIG key=value ...`: inspect the training data."""

from tpusft.data.inspect import main
from tpusft.errors import run_cli

if __name__ == "__main__":
    run_cli(main, usage="tpusft.data")
