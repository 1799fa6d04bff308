#!/usr/bin/env bash
# GPU check: one command on a machine with one (or more) NVIDIA GPU and no network.
#
#   tools/gpu_check.sh [python]        # default: python3 on PATH
#
# Expects a Python (3.11/3.12) that already has jax 0.10.x/0.11.x with its CUDA plugin, flax, optax,
# orbax-checkpoint, torch (CUDA), transformers, safetensors, tokenizers, absl-py and pytest. vLLM,
# ml_collections, math-verify and datasets are not needed. The small pure-Python wheels the code needs
# beyond that (jaxtyping, wadler-lindig, ml-collections) ship in tools/wheels/ and are installed offline
# into a throw-away target directory (nothing in the given Python changes). Then it runs:
#   1. the `gpu`-marked tests (tests/test_gpu.py): cuDNN vs XLA attention, a sharded train step vs CPU,
#      the JAX sampler vs HF generate, DLPack hand-over of the sharded param tree to torch;
#   2. a short throughput run of the JAX sampler vs HF generate (bench/rollout.py).
# Budget: <= 8 minutes. Exit code: non-zero when anything fails. Output: $OUT_DIR (default ./gpu_check_out).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python3}"
OUT_DIR="${OUT_DIR:-$PWD/gpu_check_out}"
mkdir -p "$OUT_DIR"
SITE="$(mktemp -d /tmp/atlas-gpu-check.XXXXXX)"
trap 'rm -rf "$SITE"' EXIT

echo "== python: $("$PY" -c 'import sys; print(sys.version.split()[0])')"
"$PY" - <<'PYEOF' || { echo "missing a required package (see above)"; exit 2; }
import importlib, sys
need = ["jax", "flax", "optax", "orbax.checkpoint", "torch", "transformers", "safetensors", "tokenizers",
        "absl", "pytest", "numpy"]
bad = [m for m in need if importlib.util.find_spec(m) is None]
if bad:
    print("missing:", bad); sys.exit(1)
import jax, torch, transformers, flax
print("jax", jax.__version__, "flax", flax.__version__, "torch", torch.__version__,
      "transformers", transformers.__version__, "cuda", torch.cuda.is_available())
PYEOF

# Offline install of the bundled wheels into a private dir that goes first on PYTHONPATH.
missing=()
for mod in jaxtyping wadler_lindig ml_collections; do
  "$PY" -c "import $mod" 2>/dev/null || missing+=("$mod")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "== installing bundled wheels for: ${missing[*]}"
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" tools/wheels/*.whl || exit 2
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda,cpu}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}"  # leave room for torch
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

rc=0
start=$(date +%s)
echo "== gpu tests"
timeout 360 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py \
  --junitxml="$OUT_DIR/gpu_tests.xml" 2>&1 | tee "$OUT_DIR/gpu_tests.log"
test "${PIPESTATUS[0]}" -eq 0 || rc=1

echo "== throughput (JAX sampler vs HF generate on the GPU)"
timeout 150 "$PY" -m bench.rollout --engines jax,hf --reps 1 --prompts 32 --max_tokens 64 \
  2>&1 | tee "$OUT_DIR/throughput.log"
test "${PIPESTATUS[0]}" -eq 0 || rc=1

echo "== gpu_check finished in $(( $(date +%s) - start )) s, rc=$rc (logs in $OUT_DIR)"
exit "$rc"
