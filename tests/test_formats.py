"""Row formats: detection, column maps, each format's example, and bad rows by reason."""

import pytest

from tpusft.data import formats
from tpusft.data.formats import BadRow, detect_format, final_answer, parse_row
from tpusft.errors import ConfigError, DataError


def _parse(row, fmt="auto", column_map=None):
    column_map = column_map or {}
    fmt = detect_format(list(row), fmt, column_map, "test")
    return fmt, parse_row(row, fmt, formats.fields_of(fmt, list(row), column_map))


@pytest.mark.parametrize("columns, expected", [
    (["messages"], "messages"),
    (["conversations", "id"], "sharegpt"),
    (["instruction", "input", "output"], "alpaca"),
    (["prompt", "completion"], "prompt_completion"),
    (["question", "answer"], "question_answer"),
    (["text", "meta"], "text"),
    (["prompt", "chosen", "rejected"], "preference"),
    (["system", "question", "chosen", "rejected"], "preference"),
    (["prompt", "answer"], "prompt_only"),
])
def test_detection(columns, expected):
    assert detect_format(columns, "auto", {}, "t") == expected


def test_detection_errors_name_the_fix():
    with pytest.raises(DataError, match="cannot tell the data format.*column_map"):
        detect_format(["q", "a"], "auto", {}, "t")
    with pytest.raises(DataError, match="has no column 'output' needed by data_format=alpaca"):
        detect_format(["instruction"], "alpaca", {}, "t")
    with pytest.raises(ConfigError, match="unknown field"):
        formats.parse_column_map({"instr": "prompt"})


def test_alpaca_with_column_map_input_and_system():
    fmt, ex = _parse({"prompt": "add", "ctx": "1+2", "response": "3", "system": "be brief"},
                     column_map={"instruction": "prompt", "output": "response", "input": "ctx"})
    assert fmt == "alpaca"
    assert ex.messages == [{"role": "system", "content": "be brief"},
                           {"role": "user", "content": "add\n\n1+2"},
                           {"role": "assistant", "content": "3"}]


def test_sharegpt_roles():
    _, ex = _parse({"conversations": [
        {"from": "system", "value": "s"}, {"from": "human", "value": "q"},
        {"from": "function_call", "value": "{\"name\": \"f\"}"},
        {"from": "observation", "value": "42"}, {"from": "gpt", "value": "it is 42"}]})
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant", "tool",
                                                "assistant"]


def test_messages_prompt_completion_and_gsm8k():
    _, ex = _parse({"messages": [{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "hello"}]})
    assert ex.kind == "chat" and len(ex.messages) == 2
    _, ex = _parse({"prompt": [{"role": "user", "content": "hi"}],
                    "completion": [{"role": "assistant", "content": "yo"}]})
    assert [m["content"] for m in ex.messages] == ["hi", "yo"]
    _, ex = _parse({"question": "2+2?", "answer": "2+2=4\n#### 4"})
    assert ex.messages[-1] == {"role": "assistant", "content": "2+2=4\n#### 4"}
    assert final_answer("so 1,234 apples\n#### 1,234") == "1234"


def test_text_preference_and_prompt_only():
    _, ex = _parse({"text": "raw words"})
    assert ex.kind == "text" and ex.text == "raw words"
    _, ex = _parse({"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert ex.kind == "preference" and ex.messages == [{"role": "user", "content": "q"}]
    assert ex.chosen[0]["content"] == "good" and ex.rejected[0]["content"] == "bad"
    _, ex = _parse({"system": "sys", "question": "q", "chosen": "a", "rejected": "b"})
    assert [m["role"] for m in ex.messages] == ["system", "user"]
    shared = [{"role": "user", "content": "q"}]
    _, ex = _parse({"chosen": shared + [{"role": "assistant", "content": "a"}],
                    "rejected": shared + [{"role": "assistant", "content": "b"}]})
    assert ex.messages == shared and ex.chosen[0]["content"] == "a"
    _, ex = _parse({"prompt": "q", "chosen": shared + [{"role": "assistant", "content": "a"}],
                    "rejected": shared + [{"role": "assistant", "content": "b"}]})
    assert ex.messages == shared and ex.rejected == [{"role": "assistant", "content": "b"}]
    fmt, ex = _parse({"question": "2+2?", "answer": "#### 4"}, fmt="prompt_only",
                     column_map={"prompt": "question"})
    assert fmt == "prompt_only" and ex.answer == "4" and ex.messages[-1]["content"] == "2+2?"


@pytest.mark.parametrize("row, reason", [
    ({"instruction": "a", "output": None}, "missing value"),
    ({"instruction": "a", "output": ""}, "empty content"),
    ({"instruction": ["a"], "output": "b"}, "wrong type"),
    ({"messages": "hello"}, "wrong type"),
    ({"messages": []}, "empty content"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "invalid role order"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "invalid role order"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "invalid role order"),
    ({"messages": [{"role": "user", "content": "a"}]}, "invalid role order"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
     "unknown role"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]},
     "invalid role order"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, "empty content"),
])
def test_bad_rows_have_a_reason(row, reason):
    with pytest.raises(BadRow) as e:
        _parse(row)
    assert e.value.reason == reason
