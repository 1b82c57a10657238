"""How far llama.cpp's logits on an f32 GGUF export land from transformers', with a float32
and with llama.cpp's default float16 KV cache, for tpusft's export and for llama.cpp's own
convert_hf_to_gguf.py (kept in .venv/share/llama.cpp by setup.sh --gguf), on the tiny random
model of each family that tests/test_gguf.py builds. Needs the gguf and test extras.

    .venv/bin/python benchmarks/gguf_kv_cache.py

Each figure is the largest difference over every position and vocabulary entry, as a
fraction of transformers' logit range."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

# llama.cpp's converter needs each test tokenizer's pre-tokenizer named; Gemma 2's test
# tokenizer has no tokenizer.model, which that converter requires for the family.
PRE = {"llama3": "llama-bpe", "llama3-tied": "llama-bpe", "mistral": "llama-bpe",
       "qwen2": "qwen2", "qwen3": "qwen2", "gemma3": "gpt-2"}


def main() -> None:
    import llama_cpp
    import numpy as np
    import test_gguf as oracle
    import torch
    from llama_cpp_oracle import their_gguf

    print("| family | tpusft f32 cache | tpusft f16 cache | llama.cpp's f32 cache | "
          "llama.cpp's f16 cache |")
    print("|---|---|---|---|---|")
    for name in sorted(oracle.FAMILY):
        tmp = Path(tempfile.mkdtemp())
        model, tok, ours = oracle._export(tmp, name, "f32")
        ids = tok(oracle.TEXT).input_ids
        if name.startswith("gemma"):
            oracle._ggml_gelu(model)
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].numpy()
        files = [ours]
        if name in PRE:
            files.append(their_gguf(tmp / name, tmp / "theirs.gguf", pre=PRE[name]))
        cells = []
        for path in files:
            for cache in ({"type_k": 0, "type_v": 0}, {}):  # float32, llama.cpp's default
                llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=64, verbose=False,
                                      **cache)
                llm.eval(ids)
                got = np.array(llm.scores[:len(ids)])
                cells.append(f"{np.abs(got - ref).max() / (ref.max() - ref.min()):.1e}")
                llm.close()
        cells += ["-"] * (4 - len(cells))
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
