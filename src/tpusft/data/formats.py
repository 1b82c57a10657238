"""Row formats: detected from the columns, read through a column map, checked, and turned into
one of four kinds of example (a chat, raw text, a preference pair, a prompt to answer).

Every format names its fields; `column_map` ({field: column}) reads a field from a differently
named column. A row that cannot be used raises BadRow with a short reason (counted by the
pipeline) and never reaches the tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tpusft.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                  "model": "assistant", "function_call": "assistant", "system": "system",
                  "observation": "tool", "function": "tool", "tool": "tool"}


@dataclass(frozen=True)
class Format:
    kind: str                    # chat | text | preference | prompt
    required: tuple[str, ...]    # fields every row must have
    optional: tuple[str, ...] = ()
    doc: str = ""


FORMATS: dict[str, Format] = {
    "messages": Format("chat", ("messages",), (), "{role, content} lists (system/user/"
                       "assistant/tool), multi-turn"),
    "sharegpt": Format("chat", ("conversations",), ("system",), "conversations of {from, "
                       "value} (human/gpt/system/function_call/observation)"),
    "alpaca": Format("chat", ("instruction", "output"), ("input", "system"), "instruction, "
                     "optional input, output, optional system"),
    "prompt_completion": Format("chat", ("prompt", "completion"), ("system",), "prompt and "
                                "completion, strings or message lists"),
    "question_answer": Format("chat", ("question", "answer"), ("system",), "question and "
                              "answer (GSM8K style: the final answer after ####)"),
    "text": Format("text", ("text",), (), "raw text for continued pretraining"),
    "preference": Format("preference", ("chosen", "rejected"), ("prompt", "question", "system"),
                         "prompt/chosen/rejected as strings or message lists, or system/"
                         "question/chosen/rejected"),
    "prompt_only": Format("prompt", ("prompt",), ("answer", "system"), "a prompt (string or "
                          "messages) and an optional reference answer, for GRPO"),
}
# auto-detection order: the first format whose required fields are all present.
DETECTION_ORDER = ("preference", "messages", "sharegpt", "alpaca", "prompt_completion",
                   "question_answer", "text", "prompt_only")
DATA_FORMATS = ("auto", *FORMATS)


class BadRow(ValueError):
    """A row that cannot be used; `reason` is the short category it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Example:
    """One usable row. chat: messages; text: text; preference: messages (the prompt), chosen,
    rejected (assistant turns); prompt: messages (the prompt), answer."""

    kind: str
    messages: list[dict] = field(default_factory=list)
    text: str = ""
    chosen: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    answer: str | None = None


# ---------------------------------------------------------------------- columns
def parse_column_map(value: Any) -> dict[str, str]:
    if not value:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in value.items()):
        raise ConfigError(f"column_map={value!r} must map field names to column names, e.g. "
                          f"{{instruction: prompt, output: response}}")
    known = {f for fmt in FORMATS.values() for f in (*fmt.required, *fmt.optional)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"column_map: unknown field(s) {', '.join(unknown)}; fields are "
                          f"{', '.join(sorted(known))}")
    return dict(value)


def detect_format(columns: Sequence[str], requested: str, column_map: Mapping[str, str],
                  where: str) -> str:
    """The format of a data set with `columns` ("auto" picks the first that fits)."""
    cols = set(columns)

    def has(f: str) -> bool:
        return column_map.get(f, f) in cols

    if requested != "auto":
        if requested not in FORMATS:
            raise ConfigError(f"data_format={requested!r} is not one of "
                              f"{', '.join(DATA_FORMATS)}")
        fmt = FORMATS[requested]
        missing = [repr(column_map.get(f, f)) for f in fmt.required if not has(f)]
        if missing:
            raise DataError(f"{where} has no column {', '.join(missing)} needed by data_format="
                            f"{requested} (columns: {', '.join(columns)}); name the columns "
                            f"with column_map={{field: column}}")
        return requested
    for name in DETECTION_ORDER:
        if all(has(f) for f in FORMATS[name].required):
            return name
    raise DataError(f"cannot tell the data format of {where} from its columns "
                    f"{sorted(cols)}; set data_format= (one of {', '.join(FORMATS)}) and, for "
                    f"other column names, column_map={{field: column}}")


def fields_of(fmt: str, columns: Sequence[str], column_map: Mapping[str, str]) -> dict[str, str]:
    """{field: column} of the fields of `fmt` this data set has."""
    f = FORMATS[fmt]
    return {name: column_map.get(name, name) for name in (*f.required, *f.optional)
            if column_map.get(name, name) in set(columns)}


# ---------------------------------------------------------------------- checks
def _text(value: Any, what: str, allow_empty: bool = False) -> str:
    if value is None:
        raise BadRow("missing value", what)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # a JSON number in a text column (datasets' type inference)
    if not isinstance(value, str):
        raise BadRow("wrong type", f"{what} is {type(value).__name__}, expected a string")
    if not allow_empty and not value.strip():
        raise BadRow("empty content", what)
    return value


def check_role_order(messages: Sequence[dict]) -> None:
    """system? then user, assistant alternating; tool results only after an assistant turn
    (or another tool result); at least one assistant turn."""
    prev = None
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "system":
            ok = i == 0
        elif role == "user":
            ok = prev in (None, "system", "assistant", "tool")
        elif role == "assistant":
            ok = prev in ("user", "tool")
        else:  # tool
            ok = prev in ("assistant", "tool")
        if not ok:
            order = "/".join(x["role"] for x in messages)
            raise BadRow("invalid role order", f"{role} after {prev or 'the start'} ({order})")
        prev = role


def _messages(value: Any, what: str, role_key: str = "role", content_key: str = "content",
              roles: Mapping[str, str] | None = None) -> list[dict]:
    if value is None:
        raise BadRow("missing value", what)
    if not isinstance(value, (list, tuple)) or not value:
        raise BadRow("wrong type" if not isinstance(value, (list, tuple)) else "empty content",
                     f"{what} must be a non-empty list of messages")
    out = []
    for m in value:
        if not isinstance(m, Mapping):
            raise BadRow("wrong type", f"a message of {what} is {type(m).__name__}")
        raw_role = m.get(role_key)
        role = (roles or {r: r for r in ROLES}).get(str(raw_role).lower() if raw_role else "")
        if role is None:
            raise BadRow("unknown role", f"{raw_role!r} in {what}")
        msg = {"role": role}
        if role == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = m["tool_calls"]
            msg["content"] = _text(m.get(content_key) or "", f"{what} content", allow_empty=True)
        else:
            msg["content"] = _text(m.get(content_key), f"{what} {role} content")
        out.append(msg)
    return out


def _prompt_messages(value: Any, what: str, system: Any) -> list[dict]:
    """A prompt given as a string or as messages (optionally after a system string)."""
    if isinstance(value, str):
        msgs = [{"role": "user", "content": _text(value, what)}]
    else:
        msgs = _messages(value, what)
    if system is not None and not (isinstance(system, str) and not system.strip()):
        if msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": _text(system, "system")})
    return msgs


def _completion(value: Any, what: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": _text(value, what)}]
    return _messages(value, what)


def final_answer(answer: str) -> str:
    """GSM8K's final answer: what follows the last '####', without thousands separators."""
    if "####" in answer:
        answer = answer.rsplit("####", 1)[1]
    return re.sub(r"(?<=\d),(?=\d{3})", "", answer.strip())


def _split_shared_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list, list, list]:
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


# ---------------------------------------------------------------------- rows
def parse_row(row: Mapping[str, Any], fmt: str, fields: Mapping[str, str]) -> Example:
    """The example of one row; raises BadRow."""
    def get(name: str) -> Any:
        col = fields.get(name)
        return None if col is None else row.get(col)

    system = get("system")
    if fmt == "messages":
        msgs = _messages(get("messages"), "messages")
    elif fmt == "sharegpt":
        msgs = _messages(get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
        if system and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": _text(system, "system")})
    elif fmt == "alpaca":
        instruction = _text(get("instruction"), "instruction")
        extra = get("input")
        if extra is not None and not isinstance(extra, str):
            raise BadRow("wrong type", f"input is {type(extra).__name__}, expected a string")
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        msgs = _prompt_messages(prompt, "instruction", system)
        msgs.append({"role": "assistant", "content": _text(get("output"), "output")})
    elif fmt == "prompt_completion":
        msgs = (_prompt_messages(get("prompt"), "prompt", system)
                + _completion(get("completion"), "completion"))
    elif fmt == "question_answer":
        msgs = _prompt_messages(get("question"), "question", system)
        msgs.append({"role": "assistant", "content": _text(get("answer"), "answer")})
    elif fmt == "text":
        return Example("text", text=_text(get("text"), "text"))
    elif fmt == "preference":
        chosen, rejected = _completion(get("chosen"), "chosen"), _completion(get("rejected"),
                                                                             "rejected")
        prompt = get("prompt") if get("prompt") is not None else get("question")
        if prompt is None or chosen[0]["role"] != "assistant":
            # Whole conversations (UltraFeedback's chosen/rejected repeat the prompt turns).
            msgs, chosen, rejected = _split_shared_prompt(chosen, rejected)
            if not msgs:
                raise BadRow("missing value", "prompt (no prompt column, and chosen and "
                             "rejected share no prompt turns)")
            if system and msgs[0]["role"] != "system":
                msgs.insert(0, {"role": "system", "content": _text(system, "system")})
        else:
            msgs = _prompt_messages(prompt, "prompt", system)
        for side, turns in (("chosen", chosen), ("rejected", rejected)):
            if not turns or turns[0]["role"] != "assistant":
                raise BadRow("invalid role order", f"{side} must start with an assistant turn")
            check_role_order(msgs + turns)
        return Example("preference", messages=msgs, chosen=chosen, rejected=rejected)
    elif fmt == "prompt_only":
        msgs = _prompt_messages(get("prompt"), "prompt", system)
        if msgs[-1]["role"] != "user":
            raise BadRow("invalid role order", "a prompt must end with a user turn")
        answer = get("answer")
        if answer is not None:
            answer = final_answer(_text(answer, "answer") if not isinstance(answer, (int, float))
                                  else str(answer))
        return Example("prompt", messages=msgs, answer=answer)
    else:
        raise ValueError(fmt)
    check_role_order(msgs)
    if not any(m["role"] == "assistant" for m in msgs):
        raise BadRow("invalid role order", "no assistant turn")
    return Example("chat", messages=msgs)
