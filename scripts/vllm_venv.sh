#!/usr/bin/env bash
# A separate virtual environment in which vLLM's own code loads the unilora resolver plugin (tests only).
# vLLM pins a CUDA torch of its own; on a CPU machine we install vLLM's wheel without its dependencies,
# on top of this environment's packages (CPU torch, transformers), plus the few pure-Python modules its
# LoRA and plugin code imports. Enough to run vLLM's plugin loader, resolver registry, PEFTHelper and
# validate_legal; not enough to serve (scripts/gpu_vllm_check.sh does that on a GPU machine).
#   bash scripts/vllm_venv.sh [VENV]      (default: ~/.cache/unilora/vllm-venv; prints its python)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-${UNILORA_CACHE:-$HOME/.cache/unilora}/vllm-venv}"
VLLM_VERSION="0.34.0"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm, unilora" >/dev/null 2>&1; then
    python -m venv --system-site-packages "$VENV"
    "$VENV/bin/pip" install --quiet --no-deps "vllm==$VLLM_VERSION" >&2
    "$VENV/bin/pip" install --quiet pyzmq aiohttp msgspec >&2
fi
# the unilora of this checkout, with its entry point
"$VENV/bin/pip" install --quiet --no-deps -e . >&2
echo "$VENV/bin/python"
