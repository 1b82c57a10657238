"""The demo's held-out exact match, scored twice on the same problems: by tpusft's own
greedy sampler on a checkpoint, and by another runtime on that checkpoint's export: llama.cpp
(llama-cpp-python) on a GGUF file, or transformers' `generate` on a Hugging Face directory,
called with nothing but the prompt and a token budget, so that its stop and pad ids come
from the export's own generation_config.json.

    python -m tpusft.demo.export_score runs/demo-sft.gguf configs/demo/sft.yml \
        load_parameters_path=runs/demo-sft/checkpoints
    python -m tpusft.demo.export_score runs/demo-sft-hf configs/demo/sft.yml \
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

    from tpusft.data.chat import stop_ids
    from tpusft.demo import evaluate

    llm = llama_cpp.Llama(path, n_ctx=256, logits_all=True, verbose=False)
    stop = set(stop_ids(tokenizer))
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


def transformers_answers(path: str, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Answers from transformers' `generate` on an HF export, with the export's tokenizer and
    generation config and no other arguments."""
    import torch
    import transformers

    from tpusft.demo import evaluate

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for ids in evaluate.chat_prompt_ids(tokenizer, prompts):
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x),
                               max_new_tokens=max_new_tokens)
            out.append(tokenizer.decode(y[0, len(ids):], skip_special_tokens=True).strip())
    return out


USAGE = ("usage: python -m tpusft.demo.export_score EXPORT CONFIG.yml "
         "load_parameters_path=CHECKPOINTS [key=value ...]; EXPORT is a .gguf file or a "
         "Hugging Face directory")


def main(argv: Sequence[str]) -> int:
    from tpusft.config import load_config
    from tpusft.errors import ConfigError

    if not argv or "=" in argv[0] or argv[0].endswith((".yml", ".yaml")):
        raise ConfigError(USAGE)
    export, argv = argv[0], list(argv[1:])
    gguf = export.endswith(".gguf")
    if gguf and not os.path.isfile(export):
        raise ConfigError(f"{export}: no such file; write it with "
                          "tools/convert_checkpoint/native_to_gguf.py")
    if not gguf and not os.path.isfile(os.path.join(export, "config.json")):
        raise ConfigError(f"{export}: not a Hugging Face directory (no config.json); write it "
                          "with tools/convert_checkpoint/native_to_hf.py")
    cfg = load_config(argv)
    if not cfg.demo_task or not cfg.load_parameters_path:
        raise ConfigError("pass a demo config (demo_task set) and load_parameters_path=")
    needed = ("llama_cpp", "llama-cpp-python", "--gguf") if gguf else ("torch", "PyTorch",
                                                                        "--test")
    try:
        __import__(needed[0])
    except ImportError:
        raise ConfigError(f"{needed[1]} is missing: bash tools/setup/setup.sh {needed[2]}"
                          ) from None

    from tpusft.conversion.native import restore_params
    from tpusft.data.chat import load_tokenizer
    from tpusft.demo import arithmetic, evaluate
    from tpusft.models.decoder import ModelArgs, create_model
    from tpusft.models.sharding import mesh_of

    warnings.filterwarnings("ignore", message=".*mesh.*context manager.*")
    tokenizer = load_tokenizer(cfg.tokenizer_path)
    problems = arithmetic.held_out_problems(cfg, limit=128)
    with mesh_of(cfg):
        model = create_model(ModelArgs.from_config(cfg), mesh_of(cfg), cfg.logical_axis_rules,
                             cfg.seed)
        restore_params(model, cfg.load_parameters_path)
        jax_score, rows = evaluate.exact_match(model, tokenizer, problems)
    prompts = [p for p, _ in problems]
    if gguf:
        runtime = f"llama.cpp ({os.path.basename(export)})"
        got = llama_cpp_answers(export, tokenizer, prompts, max_new_tokens=8)
    else:
        runtime = f"transformers ({os.path.basename(os.path.normpath(export))})"
        got = transformers_answers(export, prompts, max_new_tokens=8)
    score = sum(g == want for g, (_, want) in zip(got, problems, strict=True)) / len(got)
    same = sum(g == r[2] for g, r in zip(got, rows, strict=True))
    print(f"held-out exact match on {len(problems)} problems: tpusft.generate "
          f"{100 * jax_score:.1f}%, {runtime} {100 * score:.1f}%; identical answers "
          f"{same}/{len(problems)}")
    return 0


def cli() -> None:
    from tpusft.errors import run_cli

    run_cli(main, usage=lambda: "usage: python -m tpusft.demo.export_score EXPORT CONFIG.yml "
            "[key=value ...] [--debug]\n\n" + __doc__.strip() + "\n")


if __name__ == "__main__":
    cli()
