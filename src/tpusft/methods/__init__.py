"""Training methods, one record each: what a method trains on, how its step is built for a
compile-only run, how its run is plotted and how `python -m tpusft.data` shows its rows.

Code outside a method's own module reads the record and never switches on a method's name.
A new method (KTO, distillation, ...) adds:
- `methods/<name>.py`: its `Method` record, and its name in NAMES;
- `train_<name>.py`: the recipe, `run.entry` + `run.start` and its training loop;
- its loss or trainer hook under `training/` (as `training/preference_loss.py`), and an
  encoder under `data/` when its rows are new (as `data/pairs.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

# A plot panel: (title, y label, [(metrics.jsonl record kind, key, line label)]).
Panel = tuple[str, str, list[tuple[str, str, str]]]


@dataclasses.dataclass(frozen=True)
class Method:
    """One training method.

    The run: `title(cfg)` names it in what a run prints; `data_kinds` are the kinds of
    example it trains on (data/formats.py: "chat", "text", "preference", "prompt"); `panels` are its
    run plot's, named `plot_name`; `inspect(cfg, tokenizer, srcs, options, part, color)` is
    `python -m tpusft.data` for its rows (an exit code).

    Its step, as its run builds and feeds it (compile-only runs, aot/fit.py): `model_args(cfg)`,
    `make_trainer(model, optimizer, cfg)` (Tunix's config stripped of outputs) and
    `batch_shapes(cfg, rows)` of one micro-batch; or, for a step of several programs (GRPO),
    `programs(cfg, mesh)`. `flops_factor(cfg)` scales a training step's FLOPs (a reference's
    forward pass ...), `dense` names rows that come with a mask (which XLA attends),
    `rows_per_example(cfg)` and `length(cfg)` give a step's rows and their length, and
    `batch_line(cfg, rows, per_device, micro)` says what a step takes.
    """

    name: str
    title: Callable[[Any], str]
    data_kinds: tuple[str, ...]
    panels: tuple[Panel, ...]
    inspect: Callable[..., int]
    model_args: Callable
    make_trainer: Callable | None
    batch_shapes: Callable[[Any, int], dict] | None
    batch_line: Callable[[Any, int, int, str], str]
    plot_name: str = "loss curve"
    flops_factor: Callable[[Any], float] = lambda cfg: 1.0
    dense: str = ""
    programs: Callable | None = None
    rows_per_example: Callable[[Any], int] = lambda cfg: 1
    length: Callable[[Any], int] = lambda cfg: cfg.max_target_length


def dropout(cfg: Any) -> bool:
    """Whether a step's batch carries dropout keys (LoRA dropout)."""
    return bool(cfg.lora.enable_lora and cfg.lora.dropout)


# The methods' modules, each with `method() -> Method`.
NAMES = ("sft", "preference", "grpo")


def for_data(kind: str) -> Method:
    """The method that trains on examples of a kind (data/formats.py)."""
    import importlib

    records = (importlib.import_module(f"tpusft.methods.{n}").method() for n in NAMES)
    return next(m for m in records if kind in m.data_kinds)
