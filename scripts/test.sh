#!/usr/bin/env bash
# Install, then run the whole test suite (unit tests on tiny random-init models + small
# real-weights runs of both demos: MiniLM classification, SmolLM2 headlines).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -m pytest tests "$@"
