"""Chat template rendering with a loss mask computed on token ids.

Templates with `{% generation %}` tags say themselves which text the assistant generates;
their mask is transformers' assistant-token mask. For every other template, the character
spans of each assistant turn (its content and the template's end-of-turn marker, without the
whitespace after it) are found by rendering growing prefixes of the conversation; the full
text is tokenized once with offsets, and a token is trained when its characters fall inside
an assistant span. A token is never split at a turn boundary.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tpusft.errors import DataError


@dataclass
class Encoded:
    ids: np.ndarray      # int32 [n]
    trained: np.ndarray  # bool [n]: this token is a training target


class TemplateMismatch(ValueError):
    """Rendering a conversation prefix did not give a prefix of the whole rendering."""


def _render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of assistant turns."""
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = (full if i == len(messages) - 1
                   else _render(tokenizer, messages[: i + 1], add_generation_prompt=False))
        if not full.startswith(through) or not through.startswith(before):
            raise TemplateMismatch(
                f"the chat template renders turn {i} differently once later turns follow")
        end = len(through)
        while end > len(before) and through[end - 1].isspace():
            end -= 1  # the newline after an end-of-turn token is not generated
        spans.append((len(before), end))
    return full, spans


GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


@functools.lru_cache(maxsize=8)
def _tagged(template: str) -> bool:
    return bool(GENERATION_TAG.search(template))


def has_generation_tags(tokenizer) -> bool:
    """Whether the chat template marks the generated text (checked once per template)."""
    return _tagged(getattr(tokenizer, "chat_template", None) or "")


def encode_chat(tokenizer, messages: Sequence[dict], completion_only: bool = True) -> Encoded:
    if completion_only and has_generation_tags(tokenizer):
        out = tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return Encoded(np.asarray(out["input_ids"], np.int32),
                       np.asarray(out["assistant_masks"], bool))
    text, spans = assistant_spans(tokenizer, messages)
    # The Rust tokenizer directly: the Python wrapper costs more than the tokenization here.
    enc = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids, np.int32)
    if not completion_only:
        return Encoded(ids, np.ones(len(ids), bool))
    trained = np.zeros(len(ids), bool)
    offsets = None
    for start, end in spans:
        # A token is trained when its characters overlap the span: the tokens from the one
        # holding the span's first character to the one holding its last.
        first, last = enc.char_to_token(start), enc.char_to_token(end - 1)
        if first is not None and last is not None:
            trained[first:last + 1] = True
            continue
        if offsets is None:  # a normalizer dropped characters: compare offsets instead
            offsets = np.asarray(enc.offsets, np.int64).reshape(-1, 2)
        trained |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
    return Encoded(ids, trained)


def encode_prompt(tokenizer, messages: Sequence[dict]) -> np.ndarray:
    """Token ids of a prompt followed by the template's generation prompt."""
    text = _render(tokenizer, messages, add_generation_prompt=True)
    return np.asarray(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids,
                      np.int32)


def encode_text(tokenizer, text: str) -> Encoded:
    """Raw text for continued pretraining: BOS/EOS from the tokenizer, every token trained."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = list(ids) + [tokenizer.eos_token_id]
    ids = np.asarray(ids, np.int32)
    return Encoded(ids, np.ones(len(ids), bool))


# Tokens chat templates end an assistant turn with (Llama 3, ChatML/Qwen, Gemma), and
# Llama 3's end of text.
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>")


def _token_id(tokenizer, name: str) -> int | None:
    i = tokenizer.convert_tokens_to_ids(name)
    return i if isinstance(i, int) and i != tokenizer.unk_token_id else None


def end_of_turn_id(tokenizer) -> int | None:
    """The id the chat template ends a turn with, when it is a token of its own."""
    template = tokenizer.chat_template or ""
    for name in END_OF_TURN:
        if name in template and _token_id(tokenizer, name) is not None:
            return _token_id(tokenizer, name)
    return None


def stop_ids(tokenizer) -> list[int]:
    """Ids that end a generated answer: EOS, end-of-turn and end-of-text tokens."""
    ids = {tokenizer.eos_token_id}
    ids.update(_token_id(tokenizer, name) for name in (*END_OF_TURN, "<|end_of_text|>"))
    return sorted(i for i in ids if i is not None)


def has_tokenizer(directory: str) -> bool:
    """Whether a local directory holds a Hugging Face tokenizer's files."""
    from pathlib import Path

    return any(Path(directory, n).exists() for n in ("tokenizer.json", "tokenizer.model"))


def load_tokenizer(path: str):
    """A Hugging Face tokenizer from a local directory (or hub id when online)."""
    from transformers import AutoTokenizer

    if not path:
        raise DataError("tokenizer_path is empty; set it to a Hugging Face tokenizer directory")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load a tokenizer from tokenizer_path={path!r}: {first[:200]} "
                        f"(point it at a directory with tokenizer.json / tokenizer_config.json)"
                        ) from None
    if not getattr(tok, "is_fast", False):
        raise DataError(f"tokenizer at {path!r} is not a fast tokenizer; tpusft needs "
                        f"tokenizer.json (offsets are used to build loss masks)")
    return tok
