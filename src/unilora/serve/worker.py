"""The one thread that runs the model. Each turn of its loop runs the queued calls (work that must not
race with a forward: a classifier's request, attaching its adapter), then one turn of the generation
scheduler, if the server generates, then the fine-tuning jobs' part of the turn (cotraining.py),
whose training piece serves more turns at its stops. Jobs in training keep the loop turning; a
stopping server suspends them and stops.

Nothing a request does can stop the loop. An exception inside a forward is a bug of ours: it fails
the rows of that batch with 500, is logged with its traceback, and the loop goes on.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable

import torch

from .scheduler import Overloaded, Scheduler
from .slices import PieceAborted

log = logging.getLogger("unilora.serve")
ABORT_WAIT_S = 10.0  # after the drain timeout: how long stop waits for the forward in progress


class CallQueue:
    """Work to run on the worker thread between forwards; `done(result, error)` gets the outcome."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._calls: deque[tuple[Callable, Callable]] = deque()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._calls)

    def put(self, work: Callable[[], object], done: Callable[[object, BaseException | None], None]) -> None:
        with self._lock:
            if len(self._calls) >= self.max_queue:
                raise Overloaded(f"the server is busy ({len(self._calls)} requests waiting); retry shortly")
            self._calls.append((work, done))

    def run_all(self) -> None:
        while True:
            with self._lock:
                if not self._calls:
                    return
                work, done = self._calls.popleft()
            try:
                result = work()
            except BaseException as err:
                done(None, err)
            else:
                done(result, None)

    def fail_all(self, error: BaseException) -> None:
        with self._lock:
            calls = list(self._calls)
            self._calls.clear()
        for _, done in calls:
            done(None, error)


class Worker:
    def __init__(self, scheduler: Scheduler | None, *, max_queue: int, metrics=None, trainer=None):
        """`scheduler`: generation on a causal LM; None for a server that only runs calls (classifiers).
        `trainer`: the fine-tuning jobs trained between generation's turns (cotraining.CoTrainer)."""
        self.scheduler = scheduler
        self.trainer = trainer
        self.calls = CallQueue(max_queue)
        self.metrics = metrics
        self._wake = threading.Event()
        self._stopping = False
        self._abort = threading.Event()  # stop now: the loop fails what is left at its next turn
        self._thread = threading.Thread(target=self._run, name="unilora-worker", daemon=True)
        if trainer is not None:
            trainer.wake = self._wake.set
            trainer.serve_turn = self._serve_between_slices

    # --- from other threads ----------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, sequences) -> None:
        if self.scheduler is None:
            raise RuntimeError("this server runs no causal LM")  # a bug of ours: the app checks first
        if self._stopping:
            raise Overloaded("the server is shutting down")
        self.scheduler.submit(sequences)
        self._publish_queue_depth()
        self._wake.set()

    def call(self, work: Callable[[], object], done: Callable[[object, BaseException | None], None]) -> None:
        """Run `work()` on the worker thread between forwards; `done(result, error)` gets the outcome."""
        if self._stopping:
            raise Overloaded("the server is shutting down")
        self.calls.put(work, done)
        self._publish_queue_depth()
        self._wake.set()

    def stop(self, timeout: float) -> None:
        """Refuse new work, let what runs finish for up to `timeout` seconds, fail what is left with 503,
        end the thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():  # the loop fails what is left between forwards, never during one
            self._abort.set()
            self._thread.join(ABORT_WAIT_S)
        if not self._thread.is_alive() or not self._thread.ident:
            self._finish_left()
        else:  # a forward longer than the wait: tell the clients now; the rows go with the process
            self._fail_events_only()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self.calls) + (self.scheduler.waiting if self.scheduler is not None else 0)

    # --- the loop ---------------------------------------------------------------------------
    def _idle(self) -> bool:
        """Nothing to do; jobs in training keep the loop busy, except once the server stops."""
        serving = len(self.calls) or (self.scheduler is not None and self.scheduler.has_work)
        return not serving and (self.trainer is None or self._stopping or not self.trainer.has_work)

    def _run(self) -> None:
        while True:
            if self._abort.is_set():
                self._finish_left()
                self._suspend_training()
                return
            idle = self._idle()
            if idle and self._stopping:
                self._suspend_training()
                return
            if idle:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            serving = self._serve()
            if self.trainer is not None and not self._stopping:
                try:
                    self.trainer.turn(serving)  # its pieces serve between their slices (_serve_between_slices)
                except Exception:  # a bug of ours outside a job (each job fails alone): serving goes on
                    log.exception("training turn failed")

    def _serve(self) -> bool:
        """The queued calls and one turn of generation; returns whether requests ran or wait."""
        spent = 0
        try:
            with torch.no_grad():  # not inference_mode: adapters attached here must stay ordinary tensors
                self.calls.run_all()
                spent = self.scheduler.turn() if self.scheduler is not None else 0
        except Exception as err:  # a bug of ours: fail this batch, keep serving the next ones
            log.exception("generation step failed")
            self.scheduler.fail_running(500, f"internal error while generating ({type(err).__name__}); see the "
                                             "server log")
        self._publish_queue_depth()
        return spent > 0 or bool(len(self.calls)) or (self.scheduler is not None and self.scheduler.has_work)

    def _serve_between_slices(self) -> bool:
        """One serving turn at a stop of a training piece (cotraining.py); a stopping server unwinds
        the piece instead (its step is taken again when the job resumes)."""
        if self._stopping or self._abort.is_set():
            raise PieceAborted("the server is stopping")
        return self._serve()

    def _suspend_training(self) -> None:
        if self.trainer is not None:
            self.trainer.suspend()

    def _finish_left(self) -> None:
        message = "the server shut down before this request finished"
        if self.scheduler is not None:
            self.scheduler.fail_all(503, message)
        self.calls.fail_all(Overloaded(message))
        self._publish_queue_depth()

    def _fail_events_only(self) -> None:
        message = "the server shut down before this request finished"
        if self.scheduler is not None:
            for seq in self.scheduler.unfinished():
                seq.fail(503, message)
        self.calls.fail_all(Overloaded(message))

    def _publish_queue_depth(self) -> None:
        """The one writer of the queue-depth gauge."""
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.queue_depth)
