#!/usr/bin/env bash
# Install, check the package's layers (import-linter: no upward import, no cycle), then run the
# whole test suite: unit tests on tiny random-init models, and the slow tier (small real-weights
# runs of both demos, MiniLM classification and SmolLM2 headlines, and the multi-process tests).
# For day-to-day work: python -m pytest -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
lint-imports --no-logo
python -m pytest tests "$@"
