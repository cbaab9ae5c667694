#!/usr/bin/env bash
# Install, then train a Uni-LoRA adapter for the embedded all-MiniLM-L6-v2 on Rotten Tomatoes
# (a few minutes on 2 CPU cores) and print its accuracy and size. Pass e.g. --method vblora.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
unilora demo "$@"
