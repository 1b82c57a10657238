"""GRPO rewards: answer extraction and equivalence on tricky answers, the format and length
rewards, user functions, and clear errors for a reward that raises or returns the wrong shape."""

import sys
import textwrap

import numpy as np
import pytest

from tpusft.errors import ConfigError
from tpusft.rl import rewards


@pytest.mark.parametrize("completion, reference, correct", [
    ("The total is 1,234.", "1234", True),       # no marker: math-verify reads the text
    ("The total is 1,234.", "1235", False),
    ("so #### 1,234", "1234", True),              # thousands separator
    ("#### 1234", "1,234", True),
    ("#### -7", "-7", True),                       # negative numbers
    ("#### -7", "7", False),
    ("#### 7", "-7", False),
    ("#### 3/4", "0.75", True),                    # fractions
    ("\\boxed{\\frac{3}{4}}", "3/4", True),
    ("\\boxed{\\frac{1}{3}}", "0.33", False),
    ("#### 5 cm", "5", True),                      # units
    ("#### $12", "12", True),
    ("#### 12.50", "12.5", True),
    ("#### 1 #### 2", "2", True),                  # several ####: the last one counts
    ("#### 1 #### 2", "1", False),
    ("<reasoning>2+2</reasoning><answer> 4 </answer>", "4", True),
    ("<answer>3</answer> then \\boxed{4}", "3", True),  # the answer tag wins
    ("\\boxed{x^{2}}", "x^2", True),
    ("46", "46", True),                            # the demo: a bare answer
    ("", "0", False),
    ("#### ", "0", False),
])
def test_answer_correct_on_tricky_answers(completion, reference, correct):
    got = rewards.answer_correct(["q"], [completion], answer=np.array([reference]))
    assert got == [float(correct)]


def test_extract_answer():
    assert rewards.extract_answer("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert rewards.extract_answer("x #### 10\n") == "10"
    assert rewards.extract_answer(" 42 ") == "42"


def test_format_and_length_rewards(demo_tokenizer):
    fmt = rewards.make_answer_format(r"<reasoning>.+</reasoning>\s*<answer>.+</answer>")
    assert fmt([""] * 3, ["<reasoning>a\nb</reasoning>\n<answer>4</answer>",
                          "<answer>4</answer>", "<reasoning>a</reasoning><answer>4</answer>x"]
               ) == [1.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match="not a regular expression"):
        rewards.make_answer_format("(")
    # The demo tokenizer has one token per character.
    pen = rewards.make_length_penalty(demo_tokenizer, start=4, limit=8)
    assert pen([""] * 3, ["abc", "abcdef", "abcdefghijkl"]) == [0.0, -2 / 8, -8 / 8]


def test_user_reward_function_and_weights(tmp_path, monkeypatch, demo_tokenizer):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def short(prompts, completions, answer=None, **kw):
            return [1.0 if len(c) < 3 else 0.0 for c in completions]
        def broken(prompts, completions, **kw):
            raise KeyError("oops")
        def wrong_shape(prompts, completions, **kw):
            return [1.0]
        def not_numbers(prompts, completions, **kw):
            return ["a" for _ in completions]
        value = 3
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    built = rewards.build(["answer_correct", "my_rewards:short"], [2.0, 0.5],
                          tokenizer=demo_tokenizer, format_pattern=".*",
                          length_penalty_start=4, max_completion_length=8)
    assert [r.name for r in built] == ["answer_correct", "short"]
    completions = ["12", "1234"]
    answer = np.array(["12", "99"])
    assert built[0]([""] * 2, completions, answer=answer) == [2.0, 0.0]
    assert built[1]([""] * 2, completions, answer=answer) == [0.5, 0.0]
    np.testing.assert_array_equal(built[1].last, [1.0, 0.0])  # unweighted, for metrics

    def call(name):
        (r,) = rewards.build([f"my_rewards:{name}"], [], tokenizer=demo_tokenizer,
                             format_pattern=".*", length_penalty_start=4,
                             max_completion_length=8)
        return r(["p", "p"], ["a", "b"])

    with pytest.raises(rewards.RewardError, match="reward function broken raised KeyError"):
        call("broken")
    with pytest.raises(rewards.RewardError, match=r"wrong_shape returned shape \(1,\) for 2 "):
        call("wrong_shape")
    with pytest.raises(rewards.RewardError, match="not_numbers returned list that is not a list"):
        call("not_numbers")
    for spec, message in [("my_rewards:nope", "has no function 'nope'"),
                          ("my_rewards:value", "has no function 'value'"),
                          ("nomodule_xyz:f", "cannot import 'nomodule_xyz'"),
                          ("exact", "neither a built-in")]:
        with pytest.raises(ConfigError, match=message):
            rewards.build([spec], [], tokenizer=demo_tokenizer, format_pattern=".*",
                          length_penalty_start=4, max_completion_length=8)
    with pytest.raises(ConfigError, match="grpo.reward_weights has 1 value"):
        rewards.build(["answer_correct", "length_penalty"], [1.0], tokenizer=demo_tokenizer,
                      format_pattern=".*", length_penalty_start=4, max_completion_length=8)
    with pytest.raises(rewards.RewardError, match="needs a reference answer"):
        rewards.answer_correct(["p"], ["1"])
