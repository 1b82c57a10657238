#!/usr/bin/env bash
# Regenerates tests/fixtures/maxtext: tiny Llama and Qwen3 checkpoints written by MaxText's
# own converter (scanned and unscanned, float32), next to the HF checkpoints they came from;
# then runs the tests that load them.
#   bash tools/maxtext_fixtures/make_fixtures.sh      (about 5 minutes; needs PyPI access)
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${MAXTEXT_VENV:-.maxtext-venv}"
[ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import maxtext" 2>/dev/null ||
  bash tools/maxtext_fixtures/setup_maxtext_env.sh "$venv"
bash tools/setup/setup.sh --test
out=tests/fixtures/maxtext
rm -rf "$out"
.venv/bin/python tools/maxtext_fixtures/build_hf.py "$out"
common=(hardware=cpu skip_jax_distributed_system=true save_dtype=float32
        override_model_config=true base_emb_dim=64 base_num_query_heads=4
        base_num_kv_heads=2 base_num_decoder_layers=2 base_mlp_dim=128 vocab_size=256)
for spec in llama:llama3.1-8b:16 qwen3:qwen3-0.6b:32; do
  IFS=: read -r name model head_dim <<<"$spec"
  for scan in true false; do
    dir="$out/$name/$([ "$scan" = true ] && echo scanned || echo unscanned)"
    "$venv/bin/python" tools/maxtext_fixtures/run_to_maxtext.py "$out/$name/hf" \
      model_name="$model" base_output_directory="$PWD/$dir" scan_layers="$scan" \
      head_dim="$head_dim" "${common[@]}" > "/tmp/to_maxtext_${name}_$scan.log" 2>&1 ||
      { tail -30 "/tmp/to_maxtext_${name}_$scan.log"; exit 1; }
    echo "MaxText wrote $dir"
  done
done
.venv/bin/python -m pytest -q tests/test_maxtext_layout.py
