"""`python -m tpusft.config --write-base` regenerates configs/base.yml from the schema;
`python -m tpusft.config CONFIG.yml key=value ...` prints the resolved config."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tpusft.config.loader import base_yaml_text, configs_root, load_config, resolved_yaml
from tpusft.errors import run_cli


def main(argv: Sequence[str]) -> int:
    if list(argv) == ["--write-base"]:
        path = configs_root() / "base.yml"
        path.write_text(base_yaml_text())
        print(f"wrote {path}")
        return 0
    sys.stdout.write(resolved_yaml(load_config(argv)))
    return 0


if __name__ == "__main__":
    run_cli(main, usage="tpusft.config")
