"""The embedded demo: a character-level chat tokenizer and an addition data set, generated
locally and deterministically, so a first run needs no network and no download."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tpusft.errors import ConfigError

SPECIAL = ["<pad>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>", "<unk>"]
CHARS = list("0123456789abcdefghijklmnopqrstuvwxyz +-=?.,:\n")

# Llama 3's chat layout, without the date preamble.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{ message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")

TRAIN_ROWS = 20000
EVAL_ROWS = 256
MAX_OPERAND = 50


def build_tokenizer(out_dir: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens(SPECIAL)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


def _rows(pairs: list[tuple[int, int]]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"{a}+{b}="},
                          {"role": "assistant", "content": str(a + b)}]} for a, b in pairs]


def wrong_sum(a: int, b: int, rng: random.Random) -> str:
    """A near miss of a + b: off by 1, 2 or 10 (the slips a small model makes), never
    negative."""
    right = a + b
    while True:
        wrong = right + rng.choice((-10, -2, -1, 1, 2, 10))
        if wrong >= 0:
            return str(wrong)


def _preference_rows(pairs: list[tuple[int, int]], rng: random.Random) -> list[dict]:
    return [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": wrong_sum(a, b, rng)}
            for a, b in pairs]


def build_data(out_dir: Path, seed: int = 1234) -> None:
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(MAX_OPERAND) for b in range(MAX_OPERAND)]
    rng.shuffle(pairs)
    held_out, train_pairs = pairs[:EVAL_ROWS], pairs[EVAL_ROWS:]
    train = [train_pairs[rng.randrange(len(train_pairs))] for _ in range(TRAIN_ROWS)]
    files = {"train.jsonl": _rows(train), "eval.jsonl": _rows(held_out),
             # Preference pairs on the same problems: the right sum against a near miss.
             "preference_train.jsonl": _preference_rows(train, rng),
             "preference_eval.jsonl": _preference_rows(held_out, rng)}
    for name, rows in files.items():
        with open(out_dir / name, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def ensure_assets(base_output_directory: str) -> Path:
    """Creates (once) base_output_directory/demo_assets/arithmetic/{tokenizer,*.jsonl}."""
    if "://" in base_output_directory:
        root = Path.home() / ".cache" / "tpusft" / "demo_assets" / "arithmetic"
    else:
        root = Path(base_output_directory) / "demo_assets" / "arithmetic"
    done = root / ".complete-v2"  # v2: with the preference pairs
    if done.exists():
        return root
    # Built aside and moved into place: the processes of a multi-process run (or runs side by
    # side) that all find no assets never see another's half-written files.
    import os
    import shutil

    aside = root.parent / f".{root.name}-{os.getpid()}"
    (aside / "tokenizer").mkdir(parents=True, exist_ok=True)
    build_tokenizer(aside / "tokenizer")
    build_data(aside)
    (aside / done.name).write_text("ok\n")
    if root.exists() and not done.exists():  # an older version's assets
        shutil.rmtree(root, ignore_errors=True)
    try:
        os.rename(aside, root)
    except OSError:
        if not done.exists():
            raise
        shutil.rmtree(aside, ignore_errors=True)  # another process was first
    return root


def config_layer(values: dict) -> dict:
    """The config keys that point an arithmetic-demo run at the generated assets, a layer
    under which explicit settings win (config/loader.py applies it before validation): the
    tokenizer and the chat data set, or its preference pairs for
    demo_task=arithmetic_preference."""
    try:
        root = ensure_assets(values["base_output_directory"])
    except OSError as e:
        raise ConfigError(f"cannot write the demo's assets under "
                          f"{values['base_output_directory']} ({' '.join(str(e).split())[:200]}); "
                          f"set base_output_directory= to a writable directory") from None
    out = {"tokenizer_path": values.get("tokenizer_path") or str(root / "tokenizer")}
    prefix = "preference_" if values["demo_task"] == "arithmetic_preference" else ""
    if not values.get("hf_path"):
        out.update(hf_path="json", hf_data_files=str(root / f"{prefix}train.jsonl"),
                   hf_eval_files=(values.get("hf_eval_files")
                                  or str(root / f"{prefix}eval.jsonl")))
    return out


def held_out_problems(cfg, limit: int) -> list[tuple[str, str]]:
    """(user prompt, expected answer) pairs from the held-out file."""
    root = ensure_assets(cfg.base_output_directory)
    out = []
    with open(root / "eval.jsonl") as f:
        for line in f:
            msgs = json.loads(line)["messages"]
            out.append((msgs[0]["content"], msgs[1]["content"]))
            if len(out) == limit:
                break
    return out
