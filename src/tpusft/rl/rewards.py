"""GRPO rewards: the built-in library, user functions, and their weighted combination.

A reward function has the signature

    def my_reward(prompts: list[str], completions: list[str], **columns) -> list[float]

with one float per completion. `columns` holds the data set's other fields for each
completion, as arrays aligned with `completions`: `answer` (the reference answer, when the
data set has one) and `mode` ("train" or "eval"). Name one in the config as
`grpo.reward_functions=['my_module:my_reward']`; the module is imported from the working directory
or the Python path.

Built-ins (by name):
  answer_correct   1.0 when the completion's final answer equals the reference answer
                   (math-verify: 1,234 == 1234, 3/4 == 0.75 == \\frac{3}{4}, -5 == -5.0), else 0.
  answer_format    1.0 when the completion matches `format_pattern` (a regular expression for
                   the reasoning/answer template), else 0.
  length_penalty   -(tokens beyond `length_penalty_start`) / max_completion_length, so 0 for
                   short completions and -1 at the length limit.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import numpy as np

from tpusft.errors import ConfigError, UserError

RewardFn = Callable[..., Sequence[float]]

_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


class RewardError(UserError):
    """A reward function failed or returned something other than one float per completion."""


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces balanced."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    i = start = starts[-1]
    depth = 1
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
        i += 1
    return None


def extract_answer(text: str) -> str:
    """A completion's final answer: the last <answer>...</answer>, else the last \\boxed{},
    else what follows the last '####', else the whole text (stripped)."""
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    return text.strip()


def _parse(text: str):
    from math_verify import parse

    # No timeouts: math-verify's use signal.alarm, which only works in the main thread, and
    # Tunix computes rewards in a worker thread. Bare LaTeX (x^{2}, \frac{1}{2}) is read
    # as math when it is not read as text.
    return parse(text, parsing_timeout=None) or parse(f"${text}$", parsing_timeout=None)


def answers_equal(predicted: str, reference: str) -> bool:
    """Whether two final answers are the same, by math-verify; plain string equality (after
    removing thousands separators and surrounding $) when it cannot parse either."""
    from math_verify import verify

    def plain(s: str) -> str:
        return re.sub(r"(?<=\d),(?=\d{3})", "", s.strip().strip("$").strip())

    if not predicted.strip():
        return False
    if plain(predicted) == plain(reference):
        return True
    gold, pred = _parse(reference), _parse(predicted)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=None))


logging.getLogger("math_verify").setLevel(logging.ERROR)


# ------------------------------------------------------------------------ built-ins
def answer_correct(prompts, completions, answer=None, **_) -> list[float]:
    if answer is None:
        raise RewardError("answer_correct needs a reference answer: the data set has no "
                          "answer column (map one with column_map={answer: <column>})")
    return [float(answers_equal(extract_answer(c), str(a))) for c, a in
            zip(completions, answer, strict=True)]


def make_answer_format(pattern: str) -> RewardFn:
    try:
        regex = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ConfigError(f"grpo.format_pattern={pattern!r} is not a regular expression: "
                          f"{e}") from None

    def answer_format(prompts, completions, **_) -> list[float]:
        return [float(regex.fullmatch(c.strip()) is not None) for c in completions]
    return answer_format


def make_length_penalty(tokenizer, start: int, limit: int) -> RewardFn:
    def length_penalty(prompts, completions, **_) -> list[float]:
        out = []
        for c in completions:
            n = len(tokenizer.encode(c, add_special_tokens=False))
            out.append(-max(0, n - start) / max(limit, 1))
        return out
    return length_penalty


# ------------------------------------------------------------------------ loading
def load_user_function(spec: str) -> RewardFn:
    """'module:function' -> the function (the working directory is importable)."""
    module_name, sep, fn_name = spec.partition(":")
    if not sep or not module_name or not fn_name:
        raise ConfigError(f"grpo.reward_functions: {spec!r} is neither a built-in "
                          f"({', '.join(BUILTIN)}) nor 'module:function'")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"grpo.reward_functions: cannot import {module_name!r} for {spec!r}: {e}"
                          ) from None
    except SyntaxError as e:
        raise ConfigError(f"grpo.reward_functions: {e.filename}, line {e.lineno}: syntax error "
                          f"({e.msg}); fix the module of {spec!r}") from None
    except Exception as e:  # noqa: BLE001 - whatever the user's module raises on import
        import traceback

        frames = [f for f in traceback.extract_tb(e.__traceback__)
                  if not f.filename.startswith("<frozen")]
        where = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
        raise ConfigError(f"grpo.reward_functions: importing {module_name!r} raised "
                          f"{type(e).__name__}: {e}{where}; fix the module of {spec!r}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"grpo.reward_functions: {module_name!r} has no function {fn_name!r}")
    return fn


BUILTIN = ("answer_correct", "answer_format", "length_penalty")


@dataclass
class Reward:
    """One configured reward: its function, weight and name, checking every call.

    Called as Tunix calls reward functions; returns weight x value and keeps the unweighted
    values of the last call for per-reward metrics."""

    name: str
    fn: RewardFn
    weight: float = 1.0
    last: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def __name__(self) -> str:  # Tunix logs each reward under rewards/<__name__>
        return self.name

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        try:
            values = self.fn(prompts=prompts, completions=completions, **kwargs)
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(f"reward function {self.name} raised {type(e).__name__}: {e}"
                              ) from e
        try:
            arr = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise RewardError(f"reward function {self.name} returned {type(values).__name__} "
                              f"that is not a list of numbers; it must return one float per "
                              f"completion") from None
        if arr.shape != (len(completions),):
            raise RewardError(f"reward function {self.name} returned shape {arr.shape} for "
                              f"{len(completions)} completions; it must return one float per "
                              f"completion")
        if not np.isfinite(arr).all():
            raise RewardError(f"reward function {self.name} returned a NaN or infinite value")
        self.last = arr
        return list(self.weight * arr)


def build(names: Sequence[str], weights: Sequence[float], *, tokenizer, format_pattern: str,
          length_penalty_start: int, max_completion_length: int) -> list[Reward]:
    """The configured rewards, in order."""
    if not names:
        raise ConfigError("grpo.reward_functions is empty; name at least one (e.g. "
                          "answer_correct)")
    if weights and len(weights) != len(names):
        raise ConfigError(f"grpo.reward_weights has {len(weights)} value(s) for {len(names)} "
                          f"grpo.reward_functions; give one weight per function or none")
    out = []
    for i, name in enumerate(names):
        if name == "answer_correct":
            fn = answer_correct
        elif name == "answer_format":
            fn = make_answer_format(format_pattern)
        elif name == "length_penalty":
            fn = make_length_penalty(tokenizer, length_penalty_start, max_completion_length)
        else:
            fn = load_user_function(name)
            name = name.partition(":")[2]
        out.append(Reward(name, fn, float(weights[i]) if weights else 1.0))
    return out


def from_config(cfg: Any, tokenizer) -> list[Reward]:
    """The rewards the config's grpo section names."""
    g = cfg.grpo
    return build(g.reward_functions, g.reward_weights, tokenizer=tokenizer,
                 format_pattern=g.format_pattern,
                 length_penalty_start=g.length_penalty_start or g.max_completion_length // 2,
                 max_completion_length=g.max_completion_length)


def check(rewards: Sequence[Reward], batch: dict) -> None:
    """Calls every reward once on a data batch, with the reference answers as completions,
    so that one which raises or returns the wrong shape stops the run before the model is
    built and compiled (RewardError naming it)."""
    prompts = [str(p) for p in batch["prompts"]]
    completions = [str(a) for a in batch.get("answer", [""] * len(prompts))]
    columns = {k: v for k, v in batch.items() if k != "prompts"}
    for r in rewards:
        r(prompts, completions, mode="train", **columns)
        r.last = np.zeros(0)
