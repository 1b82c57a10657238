"""Loss masks on token ids under the published chat templates of Llama 3, Qwen2.5 (ChatML),
Gemma and Mistral, token by token; templates with {% generation %} tags against transformers'
own assistant-token mask."""

import numpy as np
import pytest
from chat_tokenizers import FAMILIES, chat_tokenizer

from tpusft.data.chat import encode_chat, encode_prompt
from tpusft.data.encoders import PairEncoder, SftEncoder
from tpusft.data.pipeline import DataOptions, DataStats

SYSTEM = {"role": "system", "content": "you are terse."}
TURNS = [{"role": "user", "content": "what is 2+2?"},
         {"role": "assistant", "content": "4"},
         {"role": "user", "content": "and 10+5?"},
         {"role": "assistant", "content": "15, easy."}]
# How each template writes an assistant turn's content (before its end-of-turn token).
RENDERED = {"llama3": str.strip, "qwen2.5": lambda c: c, "gemma": str.strip,
            "mistral": lambda c: " " + c}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_assistant_turns_and_end_of_turn_are_trained_token_by_token(family):
    tok = chat_tokenizer(family)
    conversation = TURNS if family == "gemma" else [SYSTEM, *TURNS]  # Gemma has no system role
    enc = encode_chat(tok, conversation)
    eot = tok.convert_tokens_to_ids(FAMILIES[family][3])
    expected = []
    for m in conversation:
        if m["role"] == "assistant":
            expected += tok(RENDERED[family](m["content"]), add_special_tokens=False)["input_ids"]
            expected.append(eot)
    assert enc.ids[enc.trained].tolist() == expected
    assert (~enc.trained).sum() == len(enc.ids) - len(expected)
    assert tok.decode(enc.ids.tolist()) == tok.apply_chat_template(conversation, tokenize=False)
    masked = tok.decode(enc.ids[~enc.trained].tolist())
    assert "what is 2+2?" in masked and "and 10+5?" in masked
    assert family == "gemma" or "you are terse." in masked
    assert "15, easy." not in masked


def test_tool_calls_are_trained_and_tool_results_masked():
    tok = chat_tokenizer("qwen2.5")
    conversation = [
        {"role": "user", "content": "what is 2+2?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "add", "arguments": {"a": 2, "b": 2}}}]},
        {"role": "tool", "content": "{\"ok\": 4}"},
        {"role": "assistant", "content": "it is 4"}]
    enc = encode_chat(tok, conversation)
    trained = tok.decode(enc.ids[enc.trained].tolist())
    masked = tok.decode(enc.ids[~enc.trained].tolist())
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call><|im_end|>' \
        in trained
    assert trained.endswith("it is 4<|im_end|>")
    assert "{\"ok\": 4}" in masked and "{\"ok\": 4}" not in trained


CHATML = ("{% for message in messages %}{% if message.role == 'assistant' %}"
          "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message.content + '<|im_end|>' }}"
          "{% endgeneration %}{{ '\\n' }}{% else %}{{ '<|im_start|>' + message.role + '\\n' + "
          "message.content + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_generation_tags_agree_with_rendered_prefixes():
    """With {% generation %} tags the mask is transformers' assistant mask; the same template
    without the tags gets the same mask from rendered prefixes."""
    tagged = chat_tokenizer("qwen2.5", CHATML)
    plain = chat_tokenizer("qwen2.5", CHATML.replace("{% generation %}", "")
                           .replace("{% endgeneration %}", ""))
    conversation = [SYSTEM, *TURNS]
    oracle = tagged.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    a, b = encode_chat(tagged, conversation), encode_chat(plain, conversation)
    assert a.ids.tolist() == b.ids.tolist() == list(oracle["input_ids"])
    assert a.trained.tolist() == [bool(x) for x in oracle["assistant_masks"]]
    assert b.trained.tolist() == a.trained.tolist() and a.trained.sum() > 4


def test_a_template_that_rejects_a_row_counts_it():
    stats = DataStats()
    enc = SftEncoder(chat_tokenizer("gemma"), "messages", {"messages": "messages"},
                     DataOptions(max_length=256), stats)
    assert enc({"messages": [SYSTEM, *TURNS]}) is None
    assert stats.bad["rejected by the chat template"] == 1
    assert "System role not supported" in stats.examples["rejected by the chat template"]


def test_prompt_and_preference_encoding():
    tok = chat_tokenizer("llama3")
    prompt = [{"role": "user", "content": "what is 2+2?"}]
    ids = encode_prompt(tok, prompt)
    assert tok.decode(ids.tolist()).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    stats = DataStats()
    enc = PairEncoder(tok, "preference", {f: f for f in ("prompt", "chosen", "rejected")},
                      DataOptions(max_length=256), stats)
    pair = enc({"prompt": prompt, "chosen": "4", "rejected": "5"})
    for side, answer in (("chosen", "4"), ("rejected", "5")):
        ids = np.append(pair[side]["inputs"], pair[side]["targets"][-1])
        assert tok.decode(ids[:len(encode_prompt(tok, prompt))].tolist()) == tok.decode(
            encode_prompt(tok, prompt).tolist())
        trained = pair[side]["targets"][pair[side]["weights"] > 0]
        assert tok.decode(trained.tolist()) == f"{answer}<|eot_id|>"
    assert enc({"prompt": prompt, "chosen": "4", "rejected": "4"}) is None
    assert stats.bad["chosen equals rejected"] == 1
