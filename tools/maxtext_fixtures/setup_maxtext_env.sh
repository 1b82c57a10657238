#!/usr/bin/env bash
# A side environment with MaxText's own checkpoint converter (PyPI maxtext needs Python 3.12).
#   bash tools/maxtext_fixtures/setup_maxtext_env.sh [DIR]   (default: .maxtext-venv)
set -euo pipefail
cd "$(dirname "$0")/../.."
dir="${1:-.maxtext-venv}"
py=""
for c in "${PYTHON312:-}" python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
  [ -n "$c" ] || continue
  if "$c" -c "import sys; sys.exit(sys.version_info[:2] != (3, 12))" 2>/dev/null; then py="$c"; break; fi
done
[ -n "$py" ] || { echo "no Python 3.12 found (set PYTHON312=)" >&2; exit 2; }
if [ ! -x "$dir/bin/python" ]; then "$py" -m venv "$dir"; fi
"$dir/bin/python" -m pip install -q --upgrade pip
# MaxText's real dependencies sit behind accelerator extras; these are what its converter
# imports on CPU (no torch: it reads safetensors through numpy).
"$dir/bin/python" -m pip install -q --no-deps maxtext==0.2.5
"$dir/bin/python" -m pip install -q "jax[cpu]==0.11.1" jaxlib==0.11.1 flax==0.12.12 \
  orbax-checkpoint==0.12.8 tensorstore==0.1.86 transformers safetensors huggingface-hub \
  omegaconf pydantic absl-py ml-dtypes numpy psutil tqdm etils jaxtyping optax pyyaml \
  qwix==0.1.8 aqtp==0.9.0 tokamax==0.0.17 grain drjax pathwaysutils jinja2 pillow tiktoken \
  sentencepiece sympy
echo "MaxText converter environment ready in $dir"
