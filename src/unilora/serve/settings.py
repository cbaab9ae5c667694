"""What an operator sets when starting `unilora serve` (the CLI's options, one field each)."""

from __future__ import annotations

from dataclasses import dataclass

from ..models.embedded_llm import EMBEDDED_LLM


@dataclass
class ServeSettings:
    adapters: str  # the store: a folder of adapter folders
    model: str = EMBEDDED_LLM
    task: str = "causal-lm"  # or "seq-cls": classifier adapters on an encoder, POST /v1/classify
    served_model_name: str | None = None  # the base model's id in /v1/models (default: `model`)
    api_key: str | None = None
    max_resident: int = 1000  # adapters attached at once (LRU beyond)
    max_resident_bytes: int = 1 << 30  # bytes their tensors may hold (LRU beyond)
    factor_cache_bytes: int = 256 << 20  # rebuilt factors kept for recently used adapters
    max_batch: int = 32  # sequences decoding together
    max_iteration_tokens: int = 128  # tokens of forward work per turn: decode rows first, then prompt chunks
    max_queue: int = 256  # requests waiting for a slot; more get 503 with Retry-After
    max_new_tokens_limit: int = 1024  # the largest max_tokens a request may ask for
    max_body_bytes: int = 1 << 20
    request_timeout: float = 120.0  # seconds from arrival to the last token
    allow_runtime_loading: str | None = None  # the root that /v1/load_lora_adapter paths must stay under
    drain_timeout: float = 30.0  # seconds SIGTERM waits for requests in flight
    device: str = "cpu"  # where the model runs ("cuda", "cuda:1", ...)
    dtype: str = "fp32"  # fp32, bf16 or fp16
    quantize: str | None = None  # int8, int4, nf4 or fp4: the base's linear layers quantized (models/quantization.py)
    fine_tuning: bool = True  # the fine-tuning API (/v1/files, /v1/fine_tuning/jobs) on a local store
    api_keys: str | None = None  # a file of `TENANT KEY` lines (KEY may be sha256:<hex>); --api-key is one tenant
    jobs_dir: str | None = None  # the fine-tuning API's state (default: a hidden folder in the store)
    max_file_mb: int = 64  # the largest training file an upload may hold
    max_training_jobs: int = 2  # jobs training at once inside the server (the others queue)
    training_share: float = 0.1  # the share of each turn's token budget training gets while requests run
    tenant_max_jobs: int = 4  # jobs per tenant that have not ended
    tenant_max_file_mb: int = 1024  # bytes of files per tenant

    @property
    def model_id(self) -> str:
        return self.served_model_name or self.model
