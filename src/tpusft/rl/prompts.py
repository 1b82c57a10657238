"""Prompts for GRPO from the data layer: any chat data set whose last turn is the reference
answer (GSM8K's question/answer, messages, alpaca, ...) or a prompt_only set, rendered with the
tokenizer's chat template (plus `system_prompt` and `prompt_template`), checked against
`max_prompt_length` (dropped or cut from the left, counted), and batched as the numpy arrays
Tunix's learners take: {"prompts": [B] str, "answer": [B] str}."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grain
import jinja2
import numpy as np

from tpusft.data import formats, pipeline
from tpusft.data.pipeline import DataStats, Source
from tpusft.errors import ConfigError, DataError


@dataclass
class PromptOptions:
    max_prompt_length: int
    system_prompt: str = ""
    prompt_template: str = "{prompt}"
    truncation: str = "left"  # drop | anything else: keep the prompt's last tokens
    bad_row_policy: str = "skip"

    @classmethod
    def from_config(cls, cfg: Any) -> PromptOptions:
        if "{prompt}" not in cfg.prompt_template:
            raise ConfigError(f"prompt_template={cfg.prompt_template!r} must contain {{prompt}}")
        return cls(cfg.max_prompt_length, cfg.system_prompt, cfg.prompt_template,
                   cfg.truncation, cfg.bad_row_policy)


class PromptEncoder:
    """row -> {"prompts": rendered prompt text, "answer": reference answer or ""}, or None."""

    def __init__(self, tokenizer, fmt: str, fields: dict[str, str], opts: PromptOptions,
                 stats: DataStats):
        self.tokenizer, self.fmt, self.fields, self.opts, self.stats = (
            tokenizer, fmt, fields, opts, stats)

    def _bad(self, row: Any, reason: str, detail: str = "") -> None:
        pipeline.bad_row(self.opts.bad_row_policy, self.stats, row, reason, detail)

    def messages(self, row: dict) -> tuple[list[dict], str]:
        """The prompt turns and the reference answer of a row; raises formats.BadRow."""
        ex = formats.parse_row(row, self.fmt, self.fields)
        if ex.kind == "prompt":
            msgs, answer = [dict(m) for m in ex.messages], ex.answer or ""
        else:  # a chat example: the last assistant turn is the reference answer
            msgs = [dict(m) for m in ex.messages]
            last = msgs.pop()
            if last["role"] != "assistant" or not msgs:
                raise formats.BadRow("invalid role order", "the last turn must be the "
                                     "assistant's reference answer, after a prompt")
            answer = formats.final_answer(last["content"])
        if self.opts.system_prompt and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": self.opts.system_prompt})
        msgs[-1]["content"] = self.opts.prompt_template.replace("{prompt}", msgs[-1]["content"])
        return msgs, answer

    def __call__(self, row: dict) -> dict | None:
        self.stats.count_row()
        try:
            msgs, answer = self.messages(row)
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False,
                                                      add_generation_prompt=True)
        except formats.BadRow as e:
            self._bad(row, e.reason, str(e).partition(": ")[2])
            return None
        except (ValueError, TypeError, jinja2.TemplateError) as e:
            self._bad(row, "rejected by the chat template", str(e).splitlines()[0][:120])
            return None
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        limit = self.opts.max_prompt_length
        if len(ids) > limit:
            if self.opts.truncation == "drop":
                self._bad(row, "over max_prompt_length", f"{len(ids)} tokens")
                return None
            self.stats.count_truncated()  # keep the end: the question and generation prompt
            text = self.tokenizer.decode(ids[-limit:], skip_special_tokens=False)
        return {"prompts": text, "answer": answer}


def _encoded(src: Source, opts: PromptOptions, data_opts: pipeline.DataOptions, tokenizer,
             stats: DataStats, part: str):
    data, columns, streamed, where = pipeline.read_source(src, data_opts, part)
    fmt = formats.detect_format(columns, src.data_format, src.column_map, where)
    kind = formats.FORMATS[fmt].kind
    if kind not in ("chat", "prompt"):
        raise DataError(f"{where} is in data_format={fmt}; GRPO needs prompts: a prompt_only, "
                        f"question_answer or chat data set (its last turn is the reference "
                        f"answer)")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat_template, needed to render GRPO prompts; "
                        "use a chat/instruct tokenizer")
    encoder = PromptEncoder(tokenizer, fmt, formats.fields_of(fmt, columns, src.column_map),
                            opts, stats)
    return data, streamed, encoder


def train_batches(sources: list[Source], opts: PromptOptions, data_opts: pipeline.DataOptions,
                  tokenizer, batch_size: int, part: str, stats: DataStats) -> grain.IterDataset:
    """Shuffled, repeated batches of `batch_size` prompts (sources mixed by weight)."""
    parts = {}
    for src in sources:
        data, streamed, encoder = _encoded(src, opts, data_opts, tokenizer, stats, part)
        if streamed:
            ds = pipeline.StreamDataset(data.shuffle(seed=data_opts.seed, buffer_size=10_000))
        else:
            ds = (grain.MapDataset.source(data).shuffle(seed=data_opts.seed)
                  .repeat(data_opts.num_epochs).to_iter_dataset())
        parts[src.name] = ds.map(encoder).filter(lambda x: x is not None)
    if len(parts) == 1:
        ds = next(iter(parts.values()))
    else:
        ds = grain.IterDataset.mix(parts, {s.name: s.weight for s in sources})
    return ds.batch(batch_size, drop_remainder=True, batch_fn=_stack)


def _stack(rows: list[dict]) -> dict:
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def held_out(sources: list[Source], opts: PromptOptions, data_opts: pipeline.DataOptions,
             tokenizer, limit: int, part: str) -> list[tuple[str, str]]:
    """Up to `limit` (prompt text, reference answer) pairs, in file order."""
    stats = DataStats()
    out: list[tuple[str, str]] = []
    for src in sources:
        data, _, encoder = _encoded(src, opts, data_opts, tokenizer, stats, part)
        for row in data:
            ex = encoder(row)
            if ex is not None:
                out.append((ex["prompts"], ex["answer"]))
            if len(out) >= limit:
                return out
    return out
