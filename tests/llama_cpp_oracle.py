"""llama.cpp's own Hugging Face -> GGUF converter (convert_hf_to_gguf.py from the same
llama-cpp-python source distribution, put in .venv/share/llama.cpp by `setup.sh --gguf`), and
perplexity as llama.cpp computes a file's logits.

A test tokenizer's pre-tokenizer fingerprint is not in the converter's table, so the runner
names it (as --tokenizer-pre does for tpusft's export); every weight is converted by the
converter's own code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

CONVERTER = Path(sys.prefix) / "share" / "llama.cpp"

_RUNNER = """
import runpy, sys
root, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [root, root + "/gguf-py"]
from conversion import base
for cls in vars(base).values():
    if isinstance(cls, type) and "get_vocab_base_pre" in vars(cls):
        cls.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [root + "/convert_hf_to_gguf.py", *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def their_gguf(hf_dir: Path, out: Path, outtype: str = "f32", pre: str = "llama-bpe") -> Path:
    """`hf_dir` converted by llama.cpp's convert_hf_to_gguf.py to `out`."""
    done = subprocess.run([sys.executable, "-c", _RUNNER, str(CONVERTER), pre, str(hf_dir),
                           "--outfile", str(out), "--outtype", outtype],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def perplexity(path: Path, tokens: list[int]) -> float:
    """exp(mean next-token NLL) of `tokens` under the GGUF file, llama.cpp computing the
    logits (float32 KV cache)."""
    import llama_cpp

    model = llama_cpp.Llama(str(path), logits_all=True, n_ctx=max(64, len(tokens)),
                            verbose=False, type_k=0, type_v=0)
    model.eval(tokens)
    logits = np.asarray(model.scores[:len(tokens)], dtype=np.float64)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    return float(np.exp(-np.mean(logp[np.arange(len(tokens) - 1), tokens[1:]])))
