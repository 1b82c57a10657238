"""Row formats: which columns each needs and how a row becomes a conversation or text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tpusft.errors import DataError

FORMAT_COLUMNS = {
    "messages": ("messages",),
    "alpaca": ("instruction", "input", "output"),
    "text": ("text",),
}
REQUIRED = {"messages": ("messages",), "alpaca": ("instruction", "output"), "text": ("text",)}


def detect_format(columns: Sequence[str], requested: str) -> str:
    if requested != "auto":
        return requested
    cols = set(columns)
    for fmt in ("messages", "alpaca", "text"):
        if set(REQUIRED[fmt]) <= cols:
            return fmt
    raise DataError(f"cannot tell the data format from columns {sorted(cols)}; set data_format= "
                    f"(messages needs 'messages', alpaca 'instruction'/'output', text 'text') "
                    f"or train_data_columns=")


def check_columns(available: Sequence[str], fmt: str, columns: Sequence[str] | None,
                  source: str) -> list[str]:
    """The columns to read; raises DataError naming any that is missing."""
    wanted = list(columns) if columns else list(REQUIRED[fmt])
    missing = [c for c in wanted if c not in available]
    if missing:
        raise DataError(f"{source} has no column {', '.join(repr(c) for c in missing)} "
                        f"(columns: {', '.join(available)}); fix train_data_columns= or "
                        f"data_format=")
    if fmt == "alpaca" and not columns and "input" in available:
        wanted = ["instruction", "input", "output"]
    return wanted


def to_messages(row: dict[str, Any], fmt: str, columns: Sequence[str]) -> list[dict] | None:
    """A conversation [{role, content}], or None for a row that cannot be used."""
    if fmt == "messages":
        msgs = row.get(columns[0])
        if not isinstance(msgs, list) or not msgs:
            return None
        out = []
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                return None
            out.append({"role": str(m.get("role")), "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            return None
        return out
    if fmt == "alpaca":
        # columns: [instruction, output] or [instruction, input, output] (train_data_columns order)
        instruction = row.get(columns[0])
        output = row.get(columns[-1] if len(columns) <= 2 else columns[2])
        extra = row.get(columns[1]) if len(columns) >= 3 else None
        if not isinstance(instruction, str) or not isinstance(output, str) or not output:
            return None
        prompt = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra else instruction
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
        if isinstance(row.get("system"), str) and row["system"]:
            msgs.insert(0, {"role": "system", "content": row["system"]})
        return msgs
    raise ValueError(fmt)


def to_text(row: dict[str, Any], columns: Sequence[str]) -> str | None:
    text = row.get(columns[0])
    return text if isinstance(text, str) and text else None
