"""The demo's held-out exact match, scored twice on the same problems: by tpusft's own
greedy sampler on a checkpoint and by llama.cpp (llama-cpp-python) on its GGUF export.

    python -m tpusft.demo.gguf_score runs/demo-sft.gguf configs/demo/sft.yml \
        load_parameters_path=runs/demo-sft/checkpoints
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

os.environ.setdefault("TQDM_DISABLE", "1")


def llama_cpp_answers(path: str, tokenizer, prompts: Sequence[str], max_new_tokens: int
                      ) -> list[str]:
    """Greedy answers from llama.cpp: the same prompt ids, stop ids and decoding as
    `evaluate.answer`, so the two scores differ only by the runtime."""
    import llama_cpp
    import numpy as np

    from tpusft.demo import evaluate

    llm = llama_cpp.Llama(path, n_ctx=256, logits_all=True, verbose=False)
    stop = set(evaluate.eos_ids(tokenizer))
    out = []
    try:
        for ids in evaluate.chat_prompt_ids(tokenizer, prompts):
            llm.reset()
            llm.eval(ids)
            new: list[int] = []
            for _ in range(max_new_tokens):
                nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                if nxt in stop:
                    break
                new.append(nxt)
                llm.eval([nxt])
            out.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    finally:
        llm.close()
    return out


def main(argv: Sequence[str]) -> int:
    from tpusft.config import load_config
    from tpusft.errors import ConfigError

    if not argv or not argv[0].endswith(".gguf"):
        raise ConfigError("usage: python -m tpusft.demo.gguf_score MODEL.gguf CONFIG.yml "
                          "load_parameters_path=CHECKPOINTS [key=value ...]")
    gguf_path, argv = argv[0], list(argv[1:])
    if not os.path.isfile(gguf_path):
        raise ConfigError(f"{gguf_path}: no such file; write it with "
                          "tools/convert_checkpoint/native_to_gguf.py")
    cfg = load_config(argv)
    if not cfg.demo_task or not cfg.load_parameters_path:
        raise ConfigError("pass a demo config (demo_task set) and load_parameters_path=")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise ConfigError("llama-cpp-python is missing: bash tools/setup/setup.sh --gguf"
                          ) from None

    from tpusft.checkpoint.native import restore_params
    from tpusft.data.chat import load_tokenizer
    from tpusft.demo import arithmetic, evaluate
    from tpusft.models.decoder import ModelArgs, create_model
    from tpusft.models.sharding import mesh_of

    warnings.filterwarnings("ignore", message=".*mesh.*context manager.*")
    arithmetic.apply_to_config(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer_path)
    problems = arithmetic.held_out_problems(cfg, limit=128)
    with mesh_of(cfg):
        model = create_model(ModelArgs.from_config(cfg), mesh_of(cfg), cfg.logical_axis_rules,
                             cfg.seed)
        restore_params(model, cfg.load_parameters_path)
        jax_score, rows = evaluate.exact_match(model, tokenizer, problems)
    got = llama_cpp_answers(gguf_path, tokenizer, [p for p, _ in problems], max_new_tokens=8)
    cpp_score = sum(g == want for g, (_, want) in zip(got, problems, strict=True)) / len(got)
    same = sum(g == r[2] for g, r in zip(got, rows, strict=True))
    print(f"held-out exact match on {len(problems)} problems: tpusft.generate "
          f"{100 * jax_score:.1f}%, llama.cpp ({os.path.basename(gguf_path)}) "
          f"{100 * cpp_score:.1f}%; identical answers {same}/{len(problems)}")
    return 0


def cli() -> None:
    from tpusft.errors import run_cli

    run_cli(main)


if __name__ == "__main__":
    cli()
