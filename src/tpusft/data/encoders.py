"""Encoders: one row of a data set -> one method's example, or None for a bad row.

The front end (pipeline.py) detects a source's format and builds the method's encoder for
it; every encoder shares the row parsing (formats.py), the bad-row accounting and the
over-length handling here, and differs only in what it makes of a parsed example:
  SftEncoder     chat or text -> token ids with a trained mask (SFT, continued pretraining)
  PromptEncoder  prompt or chat -> rendered prompt text and reference answer (GRPO)
  PairEncoder    preference -> chosen and rejected token ids with trained masks (DPO)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jinja2
import numpy as np

from tpusft.data import chat, formats
from tpusft.data.pipeline import DataOptions, DataStats, bad_row
from tpusft.errors import ConfigError, DataError

# What each kind of row is for, to say so when a method is given the wrong kind.
KIND_USE = {"chat": "supervised fine-tuning", "text": "continued pretraining",
            "preference": "preference training (train_dpo)", "prompt": "GRPO (train_grpo)"}


class Encoder:
    """row -> example or None. Subclasses set `kinds` (the row kinds the method trains on),
    `purpose` (the method, for error messages) and `encode`."""

    kinds: tuple[str, ...] = ()
    purpose: str = ""
    needs: str = ""  # what the method needs, for the wrong-kind error

    def __init__(self, tokenizer, fmt: str, fields: dict[str, str], opts: Any,
                 stats: DataStats):
        self.tokenizer, self.fmt, self.fields, self.opts, self.stats = (
            tokenizer, fmt, fields, opts, stats)
        self.kind = formats.FORMATS[fmt].kind

    def check(self, where: str) -> None:
        """Raises DataError when this source cannot feed the method."""
        if self.kind not in self.kinds:
            raise DataError(f"{where} is in data_format={self.fmt}, which {self.purpose} cannot "
                            f"train on (it is for {KIND_USE[self.kind]}); {self.purpose} needs "
                            f"{self.needs}: choose such a data set, or set data_format=")
        if self.kind != "text" and not getattr(self.tokenizer, "chat_template", None):
            raise DataError(f"the tokenizer has no chat_template, needed for data_format="
                            f"{self.fmt}; use a chat/instruct tokenizer"
                            + (" or data_format=text" if "text" in self.kinds else ""))

    def bad(self, row: Any, reason: str, detail: str = "") -> None:
        bad_row(self.opts.bad_row_policy, self.stats, row, reason, detail)

    def __call__(self, row: dict) -> dict | None:
        self.stats.count_row()
        try:
            return self.encode(formats.parse_row(row, self.fmt, self.fields), row)
        except formats.BadRow as e:
            self.bad(row, e.reason, str(e).partition(": ")[2])
        except (chat.TemplateMismatch, ValueError, TypeError, jinja2.TemplateError) as e:
            # Templates raise on what they do not support (a system turn on Gemma, ...).
            self.bad(row, "rejected by the chat template", str(e).splitlines()[0][:120])
        return None

    def encode(self, ex: formats.Example, row: dict) -> dict | None:
        raise NotImplementedError

    def fit(self, enc: chat.Encoded, row: dict) -> chat.Encoded | None:
        """`enc` within max_length + 1 tokens per `truncation` (right: keep the start, left:
        keep the end, drop: a bad row); None (counted) when nothing trained is left."""
        ids, trained = enc.ids, enc.trained
        if self.stats.lengths is not None:
            self.stats.lengths.append(len(ids))
        limit = self.opts.max_length + 1
        if len(ids) > limit:
            if self.opts.truncation == "drop":
                self.bad(row, "over max_target_length", f"{len(ids) - 1} tokens")
                return None
            self.stats.count_truncated()
            cut = slice(-limit, None) if self.opts.truncation == "left" else slice(0, limit)
            ids, trained = ids[cut], trained[cut]
        if len(ids) < 2 or not trained[1:].any():
            self.bad(row, "no trained token within max_target_length")
            return None
        return chat.Encoded(ids, trained)


@functools.lru_cache(maxsize=8)
def _longest_token(tokenizer) -> int:
    return max((len(t) for t in tokenizer.get_vocab()), default=1)


def char_budget(tokenizer, max_length: int) -> int:
    """Characters that surely make more than max_length + 1 tokens: a token spans at most
    the longest vocabulary entry's characters (doubled for normalizers that merge
    characters). Rows are cut to this before rendering, so a 10 MB row costs what its
    kept part costs, not what it costs to tokenize all of it."""
    return 2 * (max_length + 1) * _longest_token(tokenizer)


def keep_turns(messages: list[dict], budget: int, max_turns: int, from_end: bool) -> list[dict]:
    """The turns of a conversation that can reach the kept tokens: from the start (or the end,
    after a leading system turn) while their text stays within `budget` characters and their
    number within `max_turns` (each renders to a token at least), the last one cut to the
    budget. The rest would be truncated anyway; rendering them would cost time quadratic in
    the number of turns (a turn's mask comes from rendering the conversation up to it)."""
    total = sum(len(m.get("content") or "") for m in messages)
    if total <= budget and len(messages) <= max_turns:
        return messages
    head = [messages[0]] if from_end and messages[0]["role"] == "system" else []
    rest = messages[len(head):]
    order = reversed(rest) if from_end else iter(rest)
    kept, used = [], sum(len(m.get("content") or "") for m in head)
    for m in order:
        if len(kept) + len(head) >= max_turns or used >= budget:
            break
        content = m.get("content") or ""
        room = budget - used
        if len(content) > room:
            m = dict(m, content=content[-room:] if from_end else content[:room])
        kept.append(m)
        used += len(m.get("content") or "")
    if from_end:
        kept.reverse()
        while kept and kept[0]["role"] != "user":  # a conversation resumes at a user turn
            kept.pop(0)
    return head + kept or messages[:1]


def shifted(enc: chat.Encoded) -> dict[str, np.ndarray]:
    """Next-token inputs, targets and weights of one sequence."""
    return {"inputs": enc.ids[:-1], "targets": enc.ids[1:],
            "weights": enc.trained[1:].astype(np.float32)}


class SftEncoder(Encoder):
    """row -> {'inputs','targets','weights'} of one example (opts: DataOptions)."""

    kinds = ("chat", "text")
    purpose = "supervised fine-tuning"
    needs = "conversations with responses (or data_format=text)"

    def encode(self, ex: formats.Example, row: dict) -> dict | None:
        budget = char_budget(self.tokenizer, self.opts.max_length)
        size = len(ex.text) if ex.kind == "text" else sum(
            len(m.get("content") or "") for m in ex.messages)
        if size > budget:  # surely over max_target_length: only what can be kept is encoded
            if self.opts.truncation == "drop":
                self.bad(row, "over max_target_length", f"{size:,} characters")
                return None
        left = self.opts.truncation == "left"
        if ex.kind == "text":
            text = ex.text if size <= budget else (ex.text[-budget:] if left
                                                   else ex.text[:budget])
            enc = chat.encode_text(self.tokenizer, text)
        else:
            messages = keep_turns(ex.messages, budget, self.opts.max_length + 1, left)
            enc = chat.encode_chat(self.tokenizer, messages, self.opts.completion_only)
        enc = self.fit(enc, row)
        return None if enc is None else shifted(enc)


class PairEncoder(Encoder):
    """row -> {'chosen': {inputs, targets, weights}, 'rejected': {...}, 'shared': k}: each side
    is the prompt followed by its response, rendered by the chat template, with only the
    response's tokens trained; the first k tokens (the prompt: what both sides have before
    either's first trained token) are shared, so a pair's row (pairs.py) holds
    len(chosen) + len(rejected) - k tokens, at most max_length. Over that, truncation=left cuts
    the prompt's start (keeping at least one of its tokens), right (or a prompt too short to
    cut) the responses' ends, the longer response first; drop skips the pair. A pair whose
    sides are equal is a bad row (opts: DataOptions)."""

    kinds = ("preference",)
    purpose = "preference training"
    needs = "prompt/chosen/rejected rows (data_format=preference)"

    def encode(self, ex: formats.Example, row: dict) -> dict | None:
        if ex.chosen == ex.rejected:
            raise formats.BadRow("chosen equals rejected", "the pair prefers nothing")
        sides = [chat.encode_chat(self.tokenizer, [*ex.messages, *turns])
                 for turns in (ex.chosen, ex.rejected)]
        k = shared_prefix(*sides)
        total = sum(len(e.ids) for e in sides) - k
        if self.stats.lengths is not None:
            self.stats.lengths.append(total)
        over = total - self.opts.max_length
        if over > 0:
            if self.opts.truncation == "drop":
                self.bad(row, "over max_target_length", f"{total} tokens")
                return None
            self.stats.count_truncated()
            if self.opts.truncation == "left":
                cut = min(over, k - 1)
                sides = [chat.Encoded(e.ids[cut:], e.trained[cut:]) for e in sides]
                k, over = k - cut, over - cut
            if over > 0:
                tails = fit_tails([len(e.ids) - k for e in sides], over)
                sides = [chat.Encoded(e.ids[:k + n], e.trained[:k + n])
                         for e, n in zip(sides, tails, strict=True)]
        if any(len(e.ids) < 2 or not e.trained[1:].any() for e in sides):
            self.bad(row, "no trained token within max_target_length")
            return None
        return {"chosen": shifted(sides[0]), "rejected": shifted(sides[1]), "shared": k}


def shared_prefix(a: chat.Encoded, b: chat.Encoded) -> int:
    """How many leading tokens two sequences have in common before either's first trained
    token (a pair's prompt)."""
    n = min(len(a.ids), len(b.ids), int(a.trained.argmax()), int(b.trained.argmax()))
    differ = np.flatnonzero(a.ids[:n] != b.ids[:n])
    return int(differ[0]) if len(differ) else n


def fit_tails(tails: list[int], over: int) -> list[int]:
    """Two response lengths less `over` tokens in all, taken from the longer one first."""
    budget = max(sum(tails) - over, 0)
    lo = min(tails)
    hi = max(budget - lo, (budget + 1) // 2)
    return [hi, budget - hi] if tails[0] >= tails[1] else [budget - hi, hi]


@dataclass
class PromptOptions:
    max_prompt_length: int
    system_prompt: str = ""
    prompt_template: str = "{prompt}"
    truncation: str = "left"  # drop | anything else: keep the prompt's last tokens
    bad_row_policy: str = "skip"

    @classmethod
    def from_config(cls, cfg: Any) -> PromptOptions:
        if "{prompt}" not in cfg.grpo.prompt_template:
            raise ConfigError(f"grpo.prompt_template={cfg.grpo.prompt_template!r} must contain "
                              f"{{prompt}}")
        return cls(cfg.grpo.max_prompt_length, cfg.grpo.system_prompt, cfg.grpo.prompt_template,
                   cfg.truncation, cfg.bad_row_policy)


class PromptEncoder(Encoder):
    """row -> {"prompts": rendered prompt text, "answer": reference answer or ""}: a
    prompt_only row, or a chat row whose last assistant turn is the reference answer, with
    `system_prompt` and `prompt_template` applied (opts: PromptOptions)."""

    kinds = ("chat", "prompt")
    purpose = "GRPO"
    needs = "prompts: a prompt_only, question_answer or chat data set (its last turn is the "\
            "reference answer)"

    def messages(self, ex: formats.Example) -> tuple[list[dict], str]:
        """The prompt turns and the reference answer of an example; raises formats.BadRow."""
        msgs = [dict(m) for m in ex.messages]
        if ex.kind == "prompt":
            answer = ex.answer or ""
        else:  # a chat example: the last assistant turn is the reference answer
            last = msgs.pop()
            if last["role"] != "assistant" or not msgs:
                raise formats.BadRow("invalid role order", "the last turn must be the "
                                     "assistant's reference answer, after a prompt")
            answer = formats.final_answer(last["content"])
        if self.opts.system_prompt and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": self.opts.system_prompt})
        msgs[-1]["content"] = self.opts.prompt_template.replace("{prompt}", msgs[-1]["content"])
        return msgs, answer

    def encode(self, ex: formats.Example, row: dict) -> dict | None:
        msgs, answer = self.messages(ex)
        text = self.tokenizer.apply_chat_template(msgs, tokenize=False,
                                                  add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        limit = self.opts.max_prompt_length
        if len(ids) > limit:
            if self.opts.truncation == "drop":
                self.bad(row, "over max_prompt_length", f"{len(ids)} tokens")
                return None
            self.stats.count_truncated()  # keep the end: the question and generation prompt
            text = self.tokenizer.decode(ids[-limit:], skip_special_tokens=False)
        return {"prompts": text, "answer": answer}


def factory(cls: type[Encoder], tokenizer, opts: DataOptions | PromptOptions,
            stats: DataStats):
    """make_encoder(fmt, fields) for the front end."""
    return lambda fmt, fields: cls(tokenizer, fmt, fields, opts, stats)
