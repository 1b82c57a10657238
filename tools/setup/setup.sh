#!/usr/bin/env bash
# One idempotent install of tpusft into .venv (re-running it is cheap).
#   bash tools/setup/setup.sh            # CPU
#   bash tools/setup/setup.sh --tpu      # TPU VM (jax[tpu])
#   bash tools/setup/setup.sh --cuda     # NVIDIA GPU (jax[cuda12])
#   bash tools/setup/setup.sh --test     # add the test tools (combine with the above)
#   bash tools/setup/setup.sh --bench    # add what benchmarks/ compares against (TRL)
#   bash tools/setup/setup.sh --gguf     # GGUF export + llama.cpp runtime (~6 min build)
# PYTHON=/path/to/python picks the interpreter; otherwise 3.11 is preferred, 3.12 accepted
# (the test extra's CPU PyTorch, used as the logits oracle, is a small wheel on 3.11).
set -euo pipefail
cd "$(dirname "$0")/../.."

extras=()
for arg in "$@"; do
  case "$arg" in
    --tpu) extras+=(tpu) ;;
    --cuda) extras+=(cuda) ;;
    --test) extras+=(test) ;;
    --bench) extras+=(test bench) ;;
    --gguf) extras+=(gguf)
            # llama-cpp-python builds from source. GGML_NATIVE=OFF: ggml's default
            # -march=native gives a library that stops with "Illegal instruction" on a CPU
            # older than the build machine's (AVX-512/AMX hosts); the portable build keeps
            # AVX2/FMA/F16C. Its multimodal library (mtmd) is not needed to run a text model
            # and is a third of the build.
            export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF}" ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $arg (use --tpu, --cuda, --test, --bench, --gguf)" >&2; exit 2 ;;
  esac
done

ok_version() { "$1" -c 'import sys; sys.exit(0 if sys.version_info[:2] in ((3, 12), (3, 11)) else 1)' 2>/dev/null; }
find_python() {
  local c
  for c in "${PYTHON:-}" python3.11 "$HOME"/.pyenv/versions/3.11*/bin/python3.11 \
           /usr/bin/python3.11 python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 python3; do
    [ -n "$c" ] || continue
    if command -v "$c" >/dev/null 2>&1 && ok_version "$c"; then echo "$c"; return 0; fi
  done
  return 1
}

if [ ! -x .venv/bin/python ] || ! ok_version .venv/bin/python; then
  py=$(find_python) || { echo "setup.sh: no Python 3.11 or 3.12 found; set PYTHON=" >&2; exit 2; }
  echo "creating .venv with $py ($("$py" --version))"
  rm -rf .venv
  "$py" -m venv .venv
fi

spec="."
if [ ${#extras[@]} -gt 0 ]; then spec=".[$(IFS=,; echo "${extras[*]}")]"; fi
stamp=".venv/.tpusft-install"
# The stamp holds the install's hash of pyproject.toml and this script, its extras and the
# llama.cpp build flags; an install that has every extra asked for (an earlier --gguf --test
# covers a later --test) is not repeated.
hash="$(cat pyproject.toml "$0" | sha256sum | cut -c1-16)"
installed() {
  local have e
  [ -f "$stamp" ] || return 1
  [ "$(cut -d'|' -f1 "$stamp")" = "$hash" ] || return 1
  have=$(cut -d'|' -f2 "$stamp")
  for e in ${extras[@]+"${extras[@]}"}; do
    [[ ",$have," == *",$e,"* ]] || return 1
    if [ "$e" = gguf ] && [ "$(cut -d'|' -f3- "$stamp")" != "${CMAKE_ARGS:-}" ]; then
      return 1
    fi
  done
}
if installed; then
  echo "tpusft already installed in .venv ($(cut -d'|' -f2 "$stamp" | sed 's/^$/no extras/'))"
else
  .venv/bin/python -m pip install -q --upgrade pip
  if [[ " ${extras[*]:-} " == *" gguf "* ]]; then
    # Built here with the flags above, never a wheel pip cached from another build.
    llama_pin=$(grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)
    if ! .venv/bin/python -c 'import llama_cpp' 2>/dev/null ||
       [ "$(cat .venv/.tpusft-llama-cpp 2>/dev/null)" != "$llama_pin $CMAKE_ARGS" ]; then
      echo "building $llama_pin (CMAKE_ARGS=$CMAKE_ARGS; a few minutes)"
      .venv/bin/python -m pip install -q --no-cache-dir --force-reinstall --no-deps "$llama_pin"
      echo "$llama_pin $CMAKE_ARGS" > .venv/.tpusft-llama-cpp
    fi
  fi
  .venv/bin/python -m pip install -q -e "$spec"
  echo "$hash|$(IFS=,; echo "${extras[*]:-}")|${CMAKE_ARGS:-}" > "$stamp"
  echo "installed tpusft into .venv ($spec)"
fi

# llama.cpp's own HF -> GGUF converter from the same llama-cpp-python source, in
# .venv/share/llama.cpp: tests/test_gguf.py compares the GGUF export (and its quantized files)
# with it.
if [[ " ${extras[*]:-} " == *" gguf "* ]]; then
  llama_pin=$(grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)
  share=.venv/share/llama.cpp
  if [ "$(cat "$share/VERSION" 2>/dev/null)" != "$llama_pin" ]; then
    src=$(mktemp -d)
    .venv/bin/python -m pip download -q --no-deps --no-binary :all: "$llama_pin" -d "$src"
    tar xzf "$src"/llama_cpp_python-*.tar.gz -C "$src" --wildcards \
      '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion/*' \
      '*/vendor/llama.cpp/gguf-py/*'
    rm -rf "$share" && mkdir -p "$share"
    cp -r "$src"/llama_cpp_python-*/vendor/llama.cpp/{convert_hf_to_gguf.py,conversion,gguf-py} "$share"/
    echo "$llama_pin" > "$share/VERSION"
    rm -rf "$src"
  fi
fi

# tcmalloc removes most of glibc malloc's page faults in XLA's CPU runtime (faster steps);
# the launcher preloads it when present. Optional: skipped without root or apt.
if ! ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 ||
     (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1)) ||
      echo "note: libtcmalloc-minimal4 not installed (optional)"
  fi
fi
