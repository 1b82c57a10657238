"""Writes the tiny random HF checkpoints that MaxText's converter turns into test fixtures.

    .venv/bin/python tools/maxtext_fixtures/build_hf.py tests/fixtures/maxtext
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from hf_oracle import build_hf_model  # noqa: E402

# MaxText reads the architecture from its own table (patched per run to these configs); it
# hard-codes Llama 3.1's RoPE scaling, which TINY["llama3"] uses, and Qwen3-0.6B ties the
# embeddings.
MODELS = {"llama": ("llama3", {}), "qwen3": ("qwen3", {"tie_word_embeddings": True})}

if __name__ == "__main__":
    out = Path(sys.argv[1])
    for name, (tiny, overrides) in MODELS.items():
        model = build_hf_model(tiny, seed=7, **overrides)
        model.save_pretrained(out / name / "hf")
        print(f"wrote {out / name / 'hf'}")
