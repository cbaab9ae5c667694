#!/usr/bin/env bash
# On a GPU machine with vLLM installed beside unilora (`pip install vllm` then `pip install -e .`):
# vLLM serves SmolLM2-135M-Instruct with the unilora resolver plugin; three unilora adapters
# (Uni-LoRA, VB-LoRA, VeRA) are asked for by name, expanded by the plugin on first request, and
# each greedy completion is compared with `unilora generate` for the same adapter and prompt.
# Exit 0 when all three agree.   bash scripts/gpu_vllm_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="$(mktemp -d)"
PORT="${PORT:-8400}"
MODEL="$(python -c 'from unilora.models.embedded_llm import embedded_llm_folder; print(embedded_llm_folder())')"
SERVED="HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPT="The best way to learn a language is"

python - "$WORK/store" <<'PY'
import sys
from pathlib import Path

import torch

import unilora
from unilora.models.backbones import load_causal_lm

store = Path(sys.argv[1])
for name, method in (("a0", "unilora"), ("a1", "vblora"), ("a2", "vera")):
    _, base = load_causal_lm("SmolLM2-135M-Instruct")
    config = unilora.AdapterConfig(method=method, target_modules=["q_proj", "v_proj"], rank=4, theta_dim=20000,
                                   num_vectors=64, vector_length=64, topk=2, seed=1)
    model = unilora.get_model(base, config)
    generator = torch.Generator().manual_seed(len(name) + ord(name[-1]))
    for param in model.parameters():
        if param.requires_grad:
            param.data.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(store / name, task={"task": "causal-lm", "model": "SmolLM2-135M-Instruct", "kind": "text",
                                              "max_length": 512})
print(f"wrote 3 adapters to {store}")
PY

export VLLM_ALLOW_RUNTIME_LORA_UPDATING=True VLLM_PLUGINS=unilora_resolver
export UNILORA_VLLM_STORE="$WORK/store" UNILORA_VLLM_CACHE="$WORK/cache"
vllm serve "$MODEL" --served-model-name "$SERVED" --enable-lora --max-lora-rank 8 --max-loras 4 \
    --dtype float32 --host 127.0.0.1 --port "$PORT" > "$WORK/vllm.log" 2>&1 &
VLLM_PID=$!
trap 'kill $VLLM_PID 2>/dev/null; wait $VLLM_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
    kill -0 $VLLM_PID 2>/dev/null || { tail -40 "$WORK/vllm.log"; exit 1; }
    sleep 1
done

python - "$WORK/store" "$PORT" "$SERVED" "$PROMPT" <<'PY'
import subprocess
import sys

import httpx

store, port, served, prompt = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
agree = 0
for name in ("a0", "a1", "a2"):
    answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=300,
                        json={"model": name, "prompt": prompt, "max_tokens": 16, "temperature": 0})
    answer.raise_for_status()
    theirs = answer.json()["choices"][0]["text"].strip()
    ours = subprocess.run(["unilora", "generate", f"{store}/{name}", "--prompt", prompt, "--max-new-tokens", "16"],
                          capture_output=True, text=True, check=True).stdout.strip()
    agree += theirs == ours
    print(f"{name}: vLLM {theirs!r}\n{' ' * len(name)}  unilora {ours!r}  {'same' if theirs == ours else 'DIFFERENT'}")
base = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=300,
                  json={"model": "nobody", "prompt": prompt, "max_tokens": 4})
print(f"an unknown adapter: HTTP {base.status_code} (vLLM's own error)")
print(f"{agree} of 3 adapters give the same greedy text in vLLM and in unilora")
sys.exit(0 if agree == 3 else 1)
PY
