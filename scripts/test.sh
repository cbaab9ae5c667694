#!/usr/bin/env bash
# Install, then run the whole test suite (unit tests on tiny random-init models + one small
# real-weights run of the demo pipeline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -m pytest tests "$@"
