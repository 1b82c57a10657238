"""One record per training method: every kind of example has exactly one method, nothing
outside a method's record switches on a method's name, and each recipe reads top to bottom
in under 100 lines."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from tpusft import methods
from tpusft.data import formats

SRC = Path(__file__).resolve().parents[1] / "src" / "tpusft"


def test_every_kind_of_example_has_one_method():
    records = [importlib.import_module(f"tpusft.methods.{n}").method() for n in methods.NAMES]
    kinds = [k for m in records for k in m.data_kinds]
    assert sorted(kinds) == sorted({f.kind for f in formats.FORMATS.values()})
    for kind in kinds:
        assert kind in methods.for_data(kind).data_kinds
    assert [m.name for m in records] == ["SFT", "preference", "GRPO"]


def test_no_code_outside_the_records_switches_on_a_method():
    """A comparison of a method (or its name) with a literal, anywhere but methods/."""
    switch = re.compile(r"""\bmethod\w*(\.name)?\s*(==|!=|\bin\b)\s*[\"'({]|"""
                        r"""\[\s*method\w*\s*\]|\.get\(\s*method\b""")
    found = [f"{path.relative_to(SRC)}:{n}: {line.strip()}"
             for path in sorted(SRC.rglob("*.py")) if path.parent.name != "methods"
             for n, line in enumerate(path.read_text().splitlines(), 1) if switch.search(line)]
    assert found == [], "\n".join(found)


def test_recipes_read_in_under_100_lines():
    for name in ("train_sft", "train_dpo", "train_grpo"):
        lines = (SRC / f"{name}.py").read_text().splitlines()
        assert len(lines) < 100, (name, len(lines))
