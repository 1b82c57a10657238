"""Library private names: each still exists as tpusft uses it, and none is used outside
src/tpusft/internals/, so a Tunix, Orbax or Qwix upgrade that renames one fails here."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

from tpusft.internals import orbax_private, qwix_private, tunix_private

SRC = Path(__file__).resolve().parents[1] / "src" / "tpusft"
MODULES = {"google-tunix": tunix_private, "orbax-checkpoint": orbax_private,
           "qwix": qwix_private}


@pytest.mark.parametrize("package", sorted(MODULES))
def test_every_private_name_still_exists_as_used(package):
    module = MODULES[package]
    assert module.missing() == [], (
        f"{package} {importlib.metadata.version(package)} (checked against {module.VERSION}) "
        f"changed private names tpusft uses: update src/tpusft/internals/"
        f"{module.__name__.rsplit('.', 1)[1]}.py")


def test_the_check_notices_a_renamed_name(monkeypatch):
    """missing() is not blind: a name that is gone, or a parameter that is, is reported."""
    names = tunix_private.NAMES + (
        (tunix_private.peft_trainer.PeftTrainer, "_no_such_attribute", "attribute"),
        (tunix_private.peft_trainer.PeftTrainer, "_write_train_metrics", ("self", "extra")))
    monkeypatch.setattr(tunix_private, "NAMES", names)
    assert len(tunix_private.missing()) == 2
    monkeypatch.setattr(orbax_private, "NAMES", orbax_private.NAMES + (
        (orbax_private.ts_utils, "get_ts_context", ("no_such_parameter",)),))
    assert len(orbax_private.missing()) == 1
    monkeypatch.setattr(qwix_private, "NAMES", qwix_private.NAMES + (
        (qwix_private.numerics, "get_nf5_buckets", ()),))
    assert len(qwix_private.missing()) == 1


# tpusft's own private names that a library happens to use too (in its own classes).
OWN_NAMES = {"_as_text", "_buffer", "_context", "_flatten", "_last", "_lock", "_messages",
             "_metadata", "_names", "_pending", "_prepare", "_stack", "_start", "_stop"}


def _library_private_names() -> set[str]:
    import grain
    import orbax.checkpoint
    import qwix
    import tunix

    names = set()
    for package in (tunix, orbax.checkpoint, grain, qwix):
        for path in Path(package.__file__).parent.rglob("*.py"):
            names |= set(re.findall(r"(?:self\.|def )(_[a-z]\w*)", path.read_text(errors="ignore")))
    return names


def test_no_private_name_is_used_outside_internals():
    """Every private attribute or method of Tunix, Orbax or grain that tpusft reads, sets or
    overrides is reached through src/tpusft/internals/ (a name tpusft defines for itself that
    a library also has is listed in OWN_NAMES)."""
    library = _library_private_names() - OWN_NAMES
    assert {"_train_steps", "_shard_optimizer", "_checkpoint_manager"} <= library
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path.parent.name == "internals":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            used = set(re.findall(r"(?:\.|def )(_[a-z]\w*)\b", line)) & library
            if used or re.search(r"orbax\.checkpoint\._src|qwix\._src|SLF001", line):
                found.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert found == [], "private library names outside src/tpusft/internals/:\n" + "\n".join(found)
