"""Exact-match evaluation of generated answers (the demo's score)."""

from __future__ import annotations

from collections.abc import Sequence

from tpusft.data.chat import stop_ids
from tpusft.models import sampling


def chat_prompt_ids(tokenizer, user_messages: Sequence[str]) -> list[list[int]]:
    out = []
    for text in user_messages:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 tokenize=False, add_generation_prompt=True)
        out.append(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return out


def answer(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
           prefill_length: int | None = None, temperature: float = 0.0, top_k: int = 0,
           seed: int = 0) -> list[str]:
    ids = chat_prompt_ids(tokenizer, prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    new = sampling.generate(model, ids, max_new_tokens=max_new_tokens, pad_id=pad,
                            eos_ids=stop_ids(tokenizer), prefill_length=prefill_length,
                            temperature=temperature, top_k=top_k, seed=seed)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in new]


def exact_match(model, tokenizer, problems: Sequence[tuple[str, str]], max_new_tokens: int = 8
                ) -> tuple[float, list[tuple[str, str, str]]]:
    """(fraction answered exactly, [(prompt, expected, generated)])."""
    got = answer(model, tokenizer, [p for p, _ in problems], max_new_tokens=max_new_tokens)
    rows = [(p, want, g) for (p, want), g in zip(problems, got, strict=True)]
    score = sum(want == g for _, want, g in rows) / max(len(rows), 1)
    return score, rows


def report(model, tokenizer, cfg, when: str, show: int = 0, limit: int = 128) -> float:
    """The demo's held-out exact match, printed (with `show` rows); returns the score."""
    from tpusft.demo import arithmetic

    problems = arithmetic.held_out_problems(cfg, limit=limit)
    score, rows = exact_match(model, tokenizer, problems)
    print(f"held-out exact match {when}: {100 * score:.1f}% of {len(rows)}")
    for prompt, want, got in rows[:show]:
        print(f"  {prompt:<8} expected {want:<4} generated {got!r:<8} "
              f"{'ok' if want == got else 'wrong'}")
    return score
