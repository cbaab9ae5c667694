"""Shared by the server tests: a tiny random Llama with SmolLM2's real tokenizer, stores of
adapters on it, isolated greedy generation to compare with, and a real server process that is
always ended."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import unilora

METHODS = ["lora", "unilora", "vblora", "vera", "tied_lora", "fastfood", "lora_xs", "tinylora"]


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama (hidden 32) with SmolLM2's tokenizer, in a folder."""
    return write_tiny_llama(tmp_path_factory.mktemp("llama"), tokenizer)


def write_store(root: Path, model_dir: Path) -> Path:
    """Eight adapters of eight methods, `user-0.v1` ... `user-7.v1`."""
    for i, method in enumerate(METHODS):
        write_adapter(model_dir, root / f"user-{i}.v1", method, seed=i)
    return root


def smollm2_tokenizer():
    from unilora.models.embedded_llm import _GGUF_FILE, _source

    return AutoTokenizer.from_pretrained(_source().parent, gguf_file=_GGUF_FILE)


def write_tiny_llama(folder: Path, tokenizer, max_positions: int = 256) -> Path:
    """A tiny random Llama (hidden 32, seed 0) with `tokenizer`, saved in `folder`."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_positions,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_adapter(model_dir: Path, out: Path, method: str, seed: int, scale: float = 0.5) -> Path:
    """A random (not zero-initialised) adapter, so that each one changes the output."""
    base = LlamaForCausalLM.from_pretrained(model_dir)
    config = unilora.AdapterConfig(method=method, target_modules=["q_proj", "v_proj", "up_proj"], rank=4,
                                   theta_dim=300, num_vectors=12, vector_length=16, topk=2, seed=seed)
    model = unilora.get_model(base, config)
    generator = torch.Generator().manual_seed(1000 + seed)
    for param in model.parameters():
        if param.requires_grad:
            param.data.copy_(torch.randn(param.shape, generator=generator) * scale)
    model.save_pretrained(out)
    return out


def isolated_greedy(model_dir: Path, adapter_dir: Path | None, ids: list[int], max_new_tokens: int) -> list[int]:
    """What `model.generate` gives for this adapter alone (greedy, one unpadded row)."""
    base = LlamaForCausalLM.from_pretrained(model_dir).eval()
    model = base if adapter_dir is None else unilora.from_pretrained(base, adapter_dir)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             temperature=None, top_p=None, top_k=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


# Ports the kernel never hands out on its own (below Linux's ephemeral range, 32768 and up) and above
# Ray's worker ports (10002 to 19999): a server started with --ray launches many processes that take
# ephemeral ports, and one of them may take the port a test chose before Ray's HTTP proxy binds it.
QUIET_PORTS = range(20000, 32000)


def free_port() -> int:
    """A port free on 127.0.0.1 now, outside the ranges the kernel and Ray pick from."""
    for port in random.Random().sample(QUIET_PORTS, 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {QUIET_PORTS}")


class ServerProcess:
    """`unilora serve` in its own process on 127.0.0.1; `stop()` always ends it."""

    def __init__(self, log_path: Path, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "unilora", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.log_path = Path(log_path)
        self.log = open(self.log_path, "w")  # a file, not a pipe: a full pipe would block the server
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})

    def wait_ready(self, timeout: float = 120.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.output()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            time.sleep(0.2)
        raise TimeoutError("server did not become ready")

    def signal(self, sig=signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=60)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self.log.close()
