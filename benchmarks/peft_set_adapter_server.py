"""The server a user would write today, for comparison (benchmarks/serve.py (b)): FastAPI around a
PeftModel holding N LoRA adapters (r = 8 on q_proj, v_proj, random B so that each changes the
output), `set_adapter` per request, one request at a time (set_adapter changes the whole model).

    python benchmarks/peft_set_adapter_server.py --adapters 32 --port 8001
"""

from __future__ import annotations

import argparse
import threading

import torch
import uvicorn
from fastapi import FastAPI
from peft import LoraConfig, get_peft_model

from unilora.models.backbones import load_causal_lm


def build_app(count: int, device: str = "cpu", dtype: str = "fp32") -> FastAPI:
    tokenizer, base = load_causal_lm("SmolLM2-135M-Instruct")
    base = base.to(device=device, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, config, adapter_name="a0")
    for i in range(1, count):
        model.add_adapter(f"a{i}", config)
    model.eval()
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/v1/completions")
    def completions(body: dict):
        ids = tokenizer(body["prompt"], return_tensors="pt")["input_ids"].to(device)
        with lock, torch.no_grad():
            model.set_adapter(body["model"])
            out = model.generate(input_ids=ids, max_new_tokens=int(body.get("max_tokens", 16)), do_sample=False,
                                 temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:]
        return {"choices": [{"index": 0, "text": tokenizer.decode(new, skip_special_tokens=True),
                             "finish_reason": "length"}],
                "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": int(new.numel()),
                          "total_tokens": ids.shape[1] + int(new.numel())}}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    uvicorn.run(build_app(args.adapters, args.device, args.dtype), host="127.0.0.1", port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
