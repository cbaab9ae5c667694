"""Fine-tuning jobs trained inside the server, between decoding turns, on the one base model.

Each turn of the worker loop (worker.py) spends its token budget on decode rows first, then prompt
chunks (scheduler.py), then training. While requests run or wait, training gets `training_share`
of the budget per turn, so jobs progress even at peak without taking the streams' time (what
decoding leaves of the budget is not given to training: a trained token costs far more time than a
decoded one in a batch, and the streams' latency is what the budget protects); a server with nothing
to generate gives training `ALONE_FACTOR` budgets per turn. A token trained counts three (forward and
backward).

Training advances a piece at a time, one job's after another's (round robin): under load the rows a
turn's allowance pays for, one row at least; once nothing has been served for `QUIET_SECONDS`, the
rest of a step taken whole, as `unilora finetune` takes it (one-row pieces train at about 0.6x the
speed of a batch of 8 on CPU), up to `IDLE_PIECE_BUDGETS` budgets of trained tokens. A piece runs in
slices (slices.py): once it has spent what it was granted it stops at the next block boundary, and
there the worker serves one turn (decode, prompt chunks, queued calls) before the piece goes on with
that turn's allowance, so no stream waits for a whole piece (one 65-token row is about 0.6 s on 2
cores, four decode steps of 16 streams); what a piece takes past its grant is owed by the next. All
of it runs on the worker thread, the serving turns inside the piece's stops. The model changes (jobs
attached or taken off) only between pieces. When requests come back, the memory that whole steps'
activations took is handed back to the system (allocator.py), so serving under load holds only what
small pieces need.

Job lifecycle: validating_files -> queued -> running -> succeeded | failed | cancelled, kept in the
job store (job_store.py). Files are read and tokenized off the worker thread; attaching the
adapter and the training pieces run on it. At the end of each epoch the job writes a checkpoint
adapter into the store (`<job id>.step-<n>`) and its resume state; on success the adapter goes
into the store as `<job id>`, atomically, and is served at once under its `ft:` name. A job that
is stopped (SIGTERM) writes its resume state and is queued again when the server restarts; one
whose process was killed resumes from its last epoch's state. A failing job fails alone.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from ..core.errors import UniLoraError
from ..engine.model import AdaptedModel, get_model
from ..training.loop import TrainSettings
from ..training.plan import plan_run
from ..training.recipes import finetune_group_lrs
from .allocator import return_freed_memory
from .job_store import JobStore
from .scheduler import ALONE_FACTOR
from .slices import PieceAborted
from .training_job import (
    MAX_LENGTH,
    RESUME_FILE,
    TRAINING_COST,
    JobRequest,
    JobRun,
    ServedTask,
    read_dataset,
    stored_file,
)

log = logging.getLogger("unilora.serve")

QUIET_SECONDS = 0.5  # nothing served this long: the server counts as idle and jobs take whole steps
IDLE_PIECE_BUDGETS = 8  # an idle piece trains at most this many --max-iteration-tokens (its activations' memory)


def job_request(row: dict, files_dir: Path) -> JobRequest:
    hp = row["hyperparameters"]

    def given(name):
        value = hp.get(name, "auto")
        return None if value == "auto" else value

    return JobRequest(row["id"], row["seed"], given("n_epochs"), given("batch_size"), given("learning_rate_multiplier"),
                      row["adapter"], stored_file(files_dir, row["training_file"]),
                      stored_file(files_dir, row["validation_file"]) if row["validation_file"] else None)


class CoTrainer:
    def __init__(self, db: JobStore, *, model_name: str, store_root: Path, state_dir: Path, budget: int,
                 training_share: float, max_jobs: int, quantize: str | None = None, metrics=None):
        self.db = db
        self.residency = None  # the served model and its tokenizer, once loaded (`bind`)
        self.tokenizer = None
        self.tokenizer_lock = threading.Lock()
        self.model_name = model_name
        self.store_root = store_root
        self.state_dir = state_dir
        self.budget = budget
        self.training_share = training_share
        self.max_jobs = max_jobs
        self.quantize = quantize  # the served base's quantization, recorded in the jobs' adapters
        self.metrics = metrics
        self.credit: float = 0  # below zero: what the last piece took past its grants
        self.quiet_since: float | None = None  # since when nothing was served (worker thread)
        self.holding_step_memory = False  # whole-step pieces ran since serving last resumed
        self.running: deque[JobRun] = deque()  # attached, training (worker thread only)
        self.current: JobRun | None = None  # the job whose piece is in progress (worker thread only)
        self.current_whole = False  # that piece is a whole step taken on a quiet server
        self._ready: deque[JobRun] = deque()  # prepared off the worker thread, waiting to attach
        self._preparing: set[str] = set()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unilora-jobs")
        self.wake = lambda: None  # set by the worker: a prepared job is ready to attach
        self.serve_turn: Callable[[], bool] = lambda: False  # set by the worker: one serving turn, whether it served

    @property
    def files_dir(self) -> Path:
        return self.state_dir / "files"

    def bind(self, residency, tokenizer, tokenizer_lock: threading.Lock) -> None:
        """The model is loaded: jobs can start."""
        self.residency, self.tokenizer, self.tokenizer_lock = residency, tokenizer, tokenizer_lock
        self.schedule()

    # --- from request threads ------------------------------------------------------------------
    def recover(self) -> None:
        """At start-up: jobs the last process left active are validated or queued again."""
        for row in self.db.jobs_with_status("validating_files", "queued", "running"):
            if row["status"] == "running":
                resume = (self.state_dir / "jobs" / row["id"] / RESUME_FILE).exists()
                self.db.update_job(row["id"], status="queued")
                self.db.add_event(row["id"], "The server restarted; the job resumes from its last checkpoint"
                                  if resume else "The server restarted; the job starts again from its beginning")
        for row in self.db.jobs_with_status("validating_files"):
            self.validate(row["id"])

    def validate(self, job_id: str) -> None:
        self._pool.submit(self._validate, job_id)

    def cancel(self, job_id: str) -> bool:
        """Cancel an active job (its status changes at once; the worker takes its adapter off)."""
        if not self.db.set_status_unless_ended(job_id, "cancelled", finished_at=int(time.time())):
            return False
        self.db.add_event(job_id, "The job was cancelled")
        with self._lock:
            self._cancelled.add(job_id)
        self.wake()
        self._count_statuses()
        return True

    def schedule(self) -> None:
        """Prepare queued jobs while fewer than `max_jobs` run (off the worker thread)."""
        if self.residency is None:
            return
        with self._lock:
            busy = len(self.running) + len(self._ready) + len(self._preparing)
            for row in self.db.jobs_with_status("queued"):
                if busy >= self.max_jobs:
                    break
                if row["id"] in self._preparing or any(j.request.id == row["id"] for j in [*self.running, *self._ready]):
                    continue
                self._preparing.add(row["id"])
                busy += 1
                self._pool.submit(self._prepare, row)

    # --- off the worker thread ----------------------------------------------------------------------
    def _validate(self, job_id: str) -> None:
        row = self.db.job(job_id)
        if row is None or row["status"] != "validating_files":
            return
        try:
            read_dataset(job_request(row, self.files_dir))
        except UniLoraError as err:
            self._fail(job_id, "invalid_training_file", str(err))
            return
        if self.db.set_status_unless_ended(job_id, "queued"):
            self.db.add_event(job_id, "Files validated, moving job to queued state")
            self._count_statuses()
            self.schedule()

    def _prepare(self, row: dict) -> None:
        """Read and tokenize the job's data (the tokenizer shared with the request threads)."""
        try:
            request = job_request(row, self.files_dir)
            dataset = read_dataset(request)
            rates, fit = finetune_group_lrs(request.adapter.get("method", "unilora"), False, None, None, None)
            settings = TrainSettings(max_length=MAX_LENGTH, lr=1e-3, group_lrs=rates, seed=request.seed,
                                     fit_rates=fit, epochs=request.epochs, batch_size=request.batch_size,
                                     progress=False, quantize=self.quantize)
            task = ServedTask(dataset)
            with self.tokenizer_lock:
                task.prepare(self.tokenizer, self.residency.base, settings)
            plan_run(settings, task.kind, task.train_size(), 1)
            job = JobRun(request, task, settings, self.model_name, self.state_dir / "jobs" / request.id)
        except UniLoraError as err:
            self._fail(row["id"], "invalid_training_file", str(err))
            return
        except Exception as err:  # a bug of ours: the job fails, the log keeps the traceback
            log.exception("preparing job %s failed", row["id"])
            self._fail(row["id"], "internal_error", f"internal error while reading the files ({type(err).__name__})")
            return
        finally:
            with self._lock:
                self._preparing.discard(row["id"])
        with self._lock:
            self._ready.append(job)
        self.wake()

    # --- on the worker thread ------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self.running) or bool(self._ready) or bool(self._cancelled)

    def turn(self, serving: bool) -> int:
        """Training's part of one worker turn; `serving`: whether requests are running or waiting.
        Runs one job's next piece to its end, the streams served between its slices (`serve_turn`).
        Returns the credit training spent."""
        self._drop_cancelled()
        self._attach_ready()
        allowance, quiet = self._allowance(serving)
        if not self.running:
            self.credit = 0
            return 0
        self.credit = allowance if quiet else self.credit + allowance  # below zero: what the last piece owed
        if self.credit <= 0:
            return 0
        job = self.running[0]
        self.running.rotate(-1)
        rows_credit = self.credit
        if quiet:  # nobody to serve: the rest of the step at once, as `unilora finetune` takes it (in
            # slices all the same: a request that arrives meanwhile is served at the next stop)
            rows_credit = max(allowance, min(job.batch_cost(), IDLE_PIECE_BUDGETS * TRAINING_COST * self.budget))
        self.current, self.current_whole = job, quiet
        self.holding_step_memory |= quiet
        try:
            used = self._advance(job, rows_credit, self.credit)
        finally:
            self.current = None
        self.credit -= used
        self._drop_cancelled()  # those that arrived while the piece ran
        if not self.running:  # the last job ended: the worker may sleep now
            self._hand_back_step_memory()
        if self.metrics is not None:
            self.metrics.turn_tokens.labels("training").inc(used)
        return used

    def _allowance(self, serving: bool) -> tuple[float, bool]:
        """This turn's token credit for training, and whether the server counts as quiet (nothing
        served for QUIET_SECONDS)."""
        if serving or not self.running:
            self.quiet_since = None
            if self.current is None or not self.current_whole:
                self._hand_back_step_memory()
        if serving:
            return math.ceil(self.training_share * self.budget), False
        now = time.monotonic()
        if self.quiet_since is None:
            self.quiet_since = now
        return ALONE_FACTOR * self.budget, now - self.quiet_since >= QUIET_SECONDS

    def _between_slices(self) -> float:
        """At a stop of the piece in progress: one serving turn, then the credit it grants training
        (PieceAborted where the piece's job was cancelled meanwhile or the server stops)."""
        job = self.current
        with self._lock:
            cancelled = job is not None and job.request.id in self._cancelled
        if cancelled:
            raise PieceAborted(f"job {job.request.id} was cancelled")
        allowance, _ = self._allowance(self.serve_turn())
        self.credit += allowance
        return allowance

    def _hand_back_step_memory(self) -> None:
        """Serving again, or no job left: what whole steps' activations took goes back to the system."""
        if self.holding_step_memory:
            return_freed_memory()
            self.holding_step_memory = False

    def suspend(self) -> None:
        """The server stops: every running job writes its resume state and is queued for the next start
        (a piece in progress was unwound first: its step is taken again from its start)."""
        for job in list(self.running):
            try:
                job.save_resume()
                self.db.set_status_unless_ended(job.request.id, "queued")
                self.db.add_event(job.request.id, f"The server stopped; the job resumes from step {job.run.steps_done} "
                                  "when it starts again")
            except Exception:  # the process is stopping: the job resumes from its last epoch's state
                log.exception("saving job %s at shutdown failed", job.request.id)
        self.running.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _served_model(self, job: JobRun) -> AdaptedModel:
        residency = self.residency
        if residency.model is None:
            config = job.request.config(self.model_name)
            residency.model = get_model(residency.base, config, adapter_name=job.internal)
            residency.model.router.cache_limit_bytes = residency.factor_cache_bytes
            residency.model.eval()
        return residency.model

    def _attach_ready(self) -> None:
        while True:
            with self._lock:
                if not self._ready:
                    return
                job = self._ready.popleft()
            job_id = job.request.id
            if not self.db.set_status_unless_ended(job_id, "running"):
                continue  # cancelled while its files were read
            try:
                job.attach(self._served_model(job))
            except UniLoraError as err:
                job.detach()
                self._fail(job_id, "invalid_training_file", str(err))
                continue
            except Exception as err:  # a bug of ours: this job fails, serving goes on
                log.exception("starting job %s failed", job_id)
                job.detach()
                self._fail(job_id, "internal_error", f"internal error while starting the job ({type(err).__name__}); "
                           "see the server log")
                continue
            self.running.append(job)
            run = job.run
            for line in job.notes:
                self.db.add_event(job_id, line)
            self.db.add_event(job_id, f"Fine-tuning job started: {run.total_steps} steps ({job.settings.epochs} epochs "
                              f"of {run.steps_per_epoch} at batch size {job.settings.batch_size})"
                              + (f", resumed at step {run.steps_done}" if run.steps_done else ""))
            self._count_statuses()

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
        if not cancelled:
            return
        for job in [j for j in self.running if j.request.id in cancelled]:
            self.running.remove(job)
            job.detach()
        for job_id in cancelled:
            self._remove_outputs(job_id)
        self.schedule()

    def _advance(self, job: JobRun, rows_credit: float, grant: float) -> int:
        """The job's next piece (the rows `rows_credit` pays for), its first slice `grant` long, the
        streams served between its slices; then its events, checkpoint, result."""
        job_id = job.request.id
        try:
            trained = job.trained_tokens
            used, events = job.run_piece(rows_credit, grant, self._between_slices)
            for message, data in events:
                self.db.add_event(job_id, message, data=data)
            if self.metrics is not None:
                self.metrics.training_tokens.inc(job.trained_tokens - trained)
            if job.epoch_ended is not None:
                entry, job.epoch_ended = job.epoch_ended, None
                self._checkpoint(job, entry)
            if job.finished:
                self._succeed(job)
            return used
        except PieceAborted:  # cancelled (_drop_cancelled takes it off) or the server stops (suspend)
            return 0
        except (UniLoraError, OSError) as err:
            reason = str(err) if isinstance(err, UniLoraError) else f"the server could not write the job's files: {err}"
            self._end_failed(job, "job_failed", reason)
        except Exception as err:  # a bug of ours: this job fails, serving and the other jobs go on
            log.exception("job %s failed", job_id)
            self._end_failed(job, "internal_error", f"internal error while training ({type(err).__name__}); see the "
                             "server log")
        return 0

    def _checkpoint(self, job: JobRun, entry: dict) -> None:
        job_id, step = job.request.id, job.run.steps_done
        name = f"{job_id}.step-{step}"
        job.save_adapter(self.store_root / name)
        job.save_resume()
        row = self.db.job(job_id)
        metrics = {"step": step, "train_loss": entry["train_loss"]}
        if "eval_loss" in entry:  # the whole validation file is scored: OpenAI's valid_* and full_valid_* agree
            loss, accuracy = entry["eval_loss"], entry["eval_token_accuracy"]
            metrics.update(valid_loss=loss, valid_mean_token_accuracy=accuracy, full_valid_loss=loss,
                           full_valid_mean_token_accuracy=accuracy)
        self.db.add_checkpoint({"id": f"ftckpt-{job_id[6:]}-{step}", "job_id": job_id, "created_at": int(time.time()),
                                "step": step, "metrics": metrics, "store_name": name,
                                "model_name": f"{row['fine_tuned_model']}:ckpt-step-{step}"})
        self.db.add_event(job_id, f"Checkpoint created at step {step}")

    def _succeed(self, job: JobRun) -> None:
        job_id = job.request.id
        self.running.remove(job)
        job.save_adapter(self.store_root / job_id)
        if self.db.set_status_unless_ended(job_id, "succeeded", finished_at=int(time.time()), store_name=job_id,
                                           trained_tokens=job.trained_tokens):
            row = self.db.job(job_id)
            self.db.add_event(job_id, f"New fine-tuned model created: {row['fine_tuned_model']}")
            self.db.add_event(job_id, "The job has successfully completed")
            shutil.rmtree(self.state_dir / "jobs" / job_id, ignore_errors=True)
        else:  # cancelled meanwhile: nothing of it stays
            self._remove_outputs(job_id)
        job.detach()
        self._count_statuses()
        self.schedule()

    def _end_failed(self, job: JobRun, code: str, message: str) -> None:
        if job in self.running:
            self.running.remove(job)
        job.run.drop_partial_step()
        job.detach()
        self._fail(job.request.id, code, message)
        self.schedule()

    def _fail(self, job_id: str, code: str, message: str) -> None:
        error = {"code": code, "message": message, "param": None}
        if self.db.set_status_unless_ended(job_id, "failed", error=error, finished_at=int(time.time())):
            self.db.add_event(job_id, f"The job failed: {message}", level="error")
        self._count_statuses()

    def _remove_outputs(self, job_id: str) -> None:
        """What a cancelled job wrote: its checkpoints in the store, its resume state (ours only)."""
        for row in self.db.checkpoints(job_id):
            shutil.rmtree(self.store_root / row["store_name"], ignore_errors=True)
        self.db.delete_checkpoints(job_id)
        shutil.rmtree(self.state_dir / "jobs" / job_id, ignore_errors=True)

    def _count_statuses(self) -> None:
        if self.metrics is None:
            return
        for status in ("validating_files", "queued", "running", "succeeded", "failed", "cancelled"):
            self.metrics.jobs.labels(status).set(len(self.db.jobs_with_status(status)))

