#!/usr/bin/env bash
# A separate virtual environment in which vLLM's own code loads the unilora resolver plugin (tests only).
# vLLM pins a CUDA torch of its own; on a CPU machine we install vLLM's wheel without its dependencies,
# on top of the packages of the Python that runs this script (CPU torch, transformers), plus the few
# pure-Python modules its LoRA and plugin code imports. Enough to run vLLM's plugin loader, resolver
# registry, PEFTHelper and validate_legal; not enough to serve (scripts/gpu_vllm_check.sh does that on a
# GPU machine).
#   bash scripts/vllm_venv.sh [VENV]      (default: unilora's cache folder/vllm-venv; prints its python)
#
# The side environment sees this Python's own site folders through a .pth file, whether this Python is
# a virtual environment or not (`venv --system-site-packages` would show the base interpreter's folders,
# which lack torch when it was installed into a venv). An existing side environment is reused only when
# it was made for this same Python and vLLM version (its stamp says so) and everything imports.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
VLLM_VERSION="0.34.0"
VENV="${1:-$("$PYTHON" -c 'from unilora.core.resources import cache_root; print(cache_root())')/vllm-venv}"
MADE="$VENV/.made-by-unilora-vllm-venv"  # written first: this script may remove the folder
STAMP_FILE="$VENV/unilora-vllm-venv.json"  # written last: the environment is complete
# this Python's site folders (purelib, platlib, and the user's when Python reads it), one per line
SITES="$("$PYTHON" - <<'EOF'
import site, sysconfig
paths = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
if site.ENABLE_USER_SITE:
    paths.append(site.getusersitepackages())
print("\n".join(dict.fromkeys(paths)))
EOF
)"
STAMP="$("$PYTHON" -c 'import json, sys; print(json.dumps({"python": sys.executable, "vllm": sys.argv[1], "sites": sys.argv[2].splitlines()}))' "$VLLM_VERSION" "$SITES")"

ready() {
    [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP_FILE" 2>/dev/null)" = "$STAMP" ] &&
        "$VENV/bin/python" -c "
import aiohttp, msgspec, torch, transformers, unilora, vllm, zmq
from vllm.lora.peft_helper import PEFTHelper
from vllm.lora.resolver import LoRAResolverRegistry
from vllm.plugins import load_general_plugins
assert vllm.__version__ == '$VLLM_VERSION', vllm.__version__" >/dev/null 2>&1
}

if ! ready; then
    # never delete a folder this script did not make (earlier versions left no mark but vLLM in a venv)
    if [ -e "$VENV" ] && [ ! -f "$MADE" ] && ! compgen -G "$VENV/lib/python*/site-packages/vllm" >/dev/null; then
        echo "error: '$VENV' exists and was not made by scripts/vllm_venv.sh; move it away or pass another folder" >&2
        exit 2
    fi
    rm -rf "$VENV"
    mkdir -p "$VENV" && touch "$MADE"
    "$PYTHON" -m venv "$VENV"
    SIDE_SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    # addsitedir also runs the .pth files there (an editable install's among them)
    "$PYTHON" -c 'import sys; print("import site; " + "; ".join(f"site.addsitedir({p!r})" for p in sys.argv[1].splitlines()))' \
        "$SITES" > "$SIDE_SITE/unilora-outer-site.pth"
    "$VENV/bin/python" -m pip install --quiet --no-deps "vllm==$VLLM_VERSION" >&2
    "$VENV/bin/python" -m pip install --quiet pyzmq aiohttp msgspec >&2
    echo "$STAMP" > "$STAMP_FILE"  # last: a half-made environment has no stamp and is made again
    ready || { echo "error: the vLLM environment in '$VENV' does not import vllm, torch, transformers and unilora" >&2; exit 1; }
fi
# the unilora of this checkout, with its entry point
"$VENV/bin/python" -m pip install --quiet --no-deps -e . >&2
echo "$VENV/bin/python"
