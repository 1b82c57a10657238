"""Byte-level BPE tokenizers carrying real published chat templates (tests/fixtures/
chat_templates), with each family's special tokens, trained here on a small corpus so that
merges cross word and turn boundaries the way real tokenizers' do."""

from __future__ import annotations

from functools import cache
from pathlib import Path

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"

# family -> (special tokens, bos, eos, end-of-turn token)
FAMILIES = {
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>",
               "<|eot_id|>"),
    "qwen2.5": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>",
                "<|im_end|>"),
    "gemma": (["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>",
              "<end_of_turn>"),
    "mistral": (["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "</s>"),
}

CORPUS = [
    "you are terse. answer in one line.", "what is 2+2? 4", "and 10+5? 15, easy.",
    "Hello, how are you? I'm doing great. How can I help you today?",
    "The quick brown fox jumps over the lazy dog.\n\nSecond paragraph here.\n",
    "def add(a, b):\n    return a + b\n", "name: value, tool result {\"ok\": true}",
] * 20


@cache
def chat_tokenizer(family: str, template: str | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos, _ = FAMILIES[family]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos,
                                  pad_token=specials[0])
    tok.chat_template = template or (TEMPLATES / f"{family}.jinja").read_text()
    return tok
