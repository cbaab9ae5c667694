"""What one app serves: the store, the model (loaded on a background thread after the socket opens)
and its worker, the metrics; and what the handlers share: readiness, the adapter a request's `model`
names, prompt encoding and adapter preparation."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

import torch

from ..core.errors import UniLoraError
from ..data.lm_tokens import prompt_ids
from ..models.backbones import load_causal_lm
from ..models.quantization import quantize_model
from ..store.names import UnknownAdapter, check_name
from ..store.source import AdapterStore
from .adapters import PreparedAdapter, prepare_adapter
from .batch import check_model
from .classifier import Classifier
from .cotraining import CoTrainer
from .job_store import JobStore
from .metrics import Metrics
from .protocol import RequestError
from .residency import Residency
from .scheduler import Scheduler
from .settings import ServeSettings
from .tenants import Keys
from .worker import Worker

log = logging.getLogger("unilora.serve")
JOBS_FOLDER = ".unilora-jobs"  # inside the store by default: the job store, uploaded files, resume states
JOB_PREFIX = "ftjob-"  # store folders that jobs write: reached by their `ft:` names only
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Server:
    def __init__(self, settings: ServeSettings, loaded=None, on_load_failure=None):
        self.settings = settings
        self.store = AdapterStore(settings.adapters, settings.allow_runtime_loading)
        self.metrics = Metrics()
        self.worker: Worker | None = None
        self.residency: Residency | None = None  # the causal LM's adapters
        self.classifier: Classifier | None = None
        self.tokenizer = None
        self.context: int | None = None
        self.vocab_size: int | None = None  # the logits' length: logit_bias names tokens below it
        self.load_error: str | None = None
        self.created = int(time.time())
        self.tokenizer_lock = threading.Lock()
        self._loaded = loaded  # (tokenizer, model) given by a caller instead of loading `settings.model`
        self.on_load_failure = on_load_failure  # called (on the loading thread) when the model cannot load
        self._loading: threading.Thread | None = None
        self._stop_lock = threading.Lock()
        self._stopped = False
        self.keys = Keys.of(settings.api_key, settings.api_keys)  # None: no key asked for
        self.jobs: JobStore | None = None  # the fine-tuning API's files and jobs
        self.cotrainer: CoTrainer | None = None
        self.jobs_off: str | None = None  # why the fine-tuning API is off, when it is
        self._open_jobs()

    def _open_jobs(self) -> None:
        """The fine-tuning API: on a causal LM whose store is a local folder (jobs write into it). A
        server with `fine_tuning` off (a Ray replica beside the one that trains) still reads the job
        store, to serve the fine-tuned models by their `ft:` names."""
        s = self.settings
        if s.task != "causal-lm":
            self.jobs_off = "fine-tuning trains causal-LM adapters; this server serves classifiers"
            return
        if self.store.url is not None:
            self.jobs_off = "fine-tuning writes adapters into the store; serve a local --adapters folder to use it"
            return
        self.cotrain_state = Path(s.jobs_dir).resolve() if s.jobs_dir else self.store.root / JOBS_FOLDER
        try:
            self.jobs = JobStore(self.cotrain_state / "jobs.sqlite3")
        except (OSError, sqlite3.Error) as err:  # a read-only store serves on, without the fine-tuning API
            self.jobs_off = (f"fine-tuning keeps its files and jobs in '{self.cotrain_state}', which cannot be written "
                             f"({err}); start the server with --jobs-dir DIR")
            log.warning(self.jobs_off)
            return
        if not s.fine_tuning:
            self.jobs_off = "this replica serves; the fine-tuning API is answered by the one that trains"
            return
        self.cotrainer = CoTrainer(self.jobs, model_name=s.model, store_root=self.store.root,
                                   state_dir=self.cotrain_state, budget=s.max_iteration_tokens,
                                   training_share=s.training_share, max_jobs=s.max_training_jobs, quantize=s.quantize,
                                   metrics=self.metrics)
        self.cotrainer.recover()

    @property
    def ready(self) -> bool:
        return self.worker is not None

    # --- start and stop --------------------------------------------------------------------
    def start_loading(self) -> None:
        """Load on a background thread: the port opens at once, /health says when the model is ready."""
        self._loading = threading.Thread(target=self.load, name="unilora-load", daemon=True)
        self._loading.start()

    def load(self) -> None:
        """Load the model and start the worker (on a background thread at start-up)."""
        s = self.settings
        try:
            if s.task == "seq-cls":
                self.classifier = Classifier(s.model, self.metrics, s.max_resident, s.max_resident_bytes,
                                             s.factor_cache_bytes, loaded=self._loaded, device=s.device)
                self.tokenizer = self.classifier.tokenizer
                worker = Worker(None, max_queue=s.max_queue, metrics=self.metrics)
            else:
                tokenizer, model = self._loaded or load_causal_lm(s.model)
                model = model.to(device=s.device, dtype=DTYPES[s.dtype]).eval().requires_grad_(False)
                if s.quantize:
                    quantize_model(model, s.quantize).eval()
                check_model(model)
                self.tokenizer = tokenizer
                self.context = getattr(model.config, "max_position_embeddings", None)
                self.vocab_size = model.get_output_embeddings().weight.shape[0]
                self.residency = Residency(model, s.max_resident, s.max_resident_bytes, s.factor_cache_bytes,
                                           self.metrics)
                scheduler = Scheduler(self.residency, tokenizer, max_batch=s.max_batch, max_queue=s.max_queue,
                                      max_iteration_tokens=s.max_iteration_tokens,
                                      metrics=self.metrics, tokenizer_lock=self.tokenizer_lock)
                worker = Worker(scheduler, max_queue=s.max_queue, metrics=self.metrics, trainer=self.cotrainer)
        except UniLoraError as err:
            self.load_error = str(err)
        except Exception as err:  # not the user's input: keep the traceback in the log
            log.exception("loading the model failed")
            self.load_error = f"{type(err).__name__}: {err}"
        if self.load_error is not None:
            if self.on_load_failure is not None:
                self.on_load_failure()
            return
        with self._stop_lock:
            if self._stopped:  # told to stop while loading: never start serving
                return
            worker.start()
            self.worker = worker
        if self.cotrainer is not None and self.residency is not None:
            self.cotrainer.bind(self.residency, self.tokenizer, self.tokenizer_lock)
        log.info("ready: %s, adapters from %s", s.model_id, self.store.root)

    def stop(self) -> None:
        """Drain (worker.Worker.stop); called by the first exit signal and again at shutdown, which then
        waits for the first call to end."""
        with self._stop_lock:
            if not self._stopped and self.worker is not None:
                self.worker.stop(timeout=self.settings.drain_timeout)
            self._stopped = True

    def busy(self) -> bool:
        """Whether a thread of ours still runs torch: the model loading, or a forward past the drain."""
        return ((self._loading is not None and self._loading.is_alive())
                or (self.worker is not None and self.worker.alive))

    # --- what handlers share ---------------------------------------------------------------
    def require_ready(self) -> Worker:
        if self.worker is None:
            message = f"the model failed to load: {self.load_error}" if self.load_error else "the model is still loading"
            raise RequestError(503, message, retry_after=5)
        return self.worker

    def adapter_of(self, model: str, tenant: str) -> str | None:
        """The store name a request's `model` names; None for the base model. A fine-tuned model
        (`ft:...`) is found only by the tenant whose job made it; the folders jobs write are reached
        only by those names."""
        if model in (self.settings.model_id, self.settings.model):
            return None
        missing = UnknownAdapter(f"the model '{model[:200]}' does not exist")
        if model.startswith("ft:"):
            found = self.fine_tuned_models(tenant).get(model)
            if found is None:
                raise missing
            return found
        check_name(model)
        if model.startswith(JOB_PREFIX):
            raise missing
        return model

    def fine_tuned_models(self, tenant: str) -> dict[str, str]:
        """The tenant's fine-tuned models and checkpoints: `ft:` name -> store folder."""
        if self.jobs is None:
            return {}
        return {name: folder for folder, (name, owner) in self.jobs.store_names().items() if owner == tenant}

    def prepare(self, name: str, holds: int) -> PreparedAdapter:
        """Adapter `name`, checked and held for `holds` sequences (on a thread-pool thread)."""
        holder = self.residency if self.residency is not None else self.classifier
        shape = self.residency.shape if self.residency is not None else None
        return prepare_adapter(self.store, holder, name, holds, shape, self.metrics)

    def release(self, prepared: PreparedAdapter | None, holds: int) -> None:
        """End holds that no sequence will take (the request ended before the worker admitted it)."""
        if prepared is None or prepared.file is not None:
            return
        holder = self.residency if self.residency is not None else self.classifier
        for _ in range(holds):
            holder.release(prepared.name)

    def encode(self, prompt) -> list[int]:
        with self.tokenizer_lock:
            return prompt_ids(self.tokenizer, prompt, isinstance(prompt, list))
