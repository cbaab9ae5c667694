"""What `GET /metrics` reports, in Prometheus's text format (one registry per app, so that two
servers in one process, as in tests, never share counters).

Per-adapter series are left out on purpose: a store of 10,000 adapters would make 10,000 series
per metric. Adapter loads, evictions and residency are counted in total."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("unilora_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.request_seconds = Histogram("unilora_request_seconds", "Time from request to last byte",
                                         ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram("unilora_time_to_first_token_seconds",
                                             "Time from a request's arrival to its first generated token",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("unilora_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("unilora_generated_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("unilora_queue_depth", "Requests waiting for a slot in the batch", registry=r)
        self.running_rows = Gauge("unilora_running_rows", "Sequences decoding in the running batch", registry=r)
        self.resident_adapters = Gauge("unilora_resident_adapters", "Adapters attached to the model", registry=r)
        self.resident_bytes = Gauge("unilora_resident_adapter_bytes",
                                    "Bytes of the tensors the resident adapters hold", registry=r)
        self.adapter_loads = Counter("unilora_adapter_loads", "Adapters attached from the store", registry=r)
        self.adapter_load_seconds = Histogram("unilora_adapter_load_seconds", "Time to attach one adapter",
                                              buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_evictions = Counter("unilora_adapter_evictions", "Adapters detached by the LRU", registry=r)
        self.worker_turns = Counter("unilora_worker_turns", "Turns of the worker loop that did work", registry=r)
        self.turn_tokens = Counter("unilora_turn_tokens", "Token budget spent by the worker's turns, by use "
                                   "(decode, prefill, training; a trained token counts 3)", ["use"], registry=r)
        self.training_tokens = Counter("unilora_training_tokens",
                                       "Tokens of training rows that fine-tuning jobs trained on (padding not counted)",
                                       registry=r)
        self.jobs = Gauge("unilora_fine_tuning_jobs", "Fine-tuning jobs by status", ["status"], registry=r)
        self.adapter_errors = Counter("unilora_adapter_errors", "Requests refused for an unusable adapter",
                                      registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
