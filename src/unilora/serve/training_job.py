"""One fine-tuning job trained inside the server, on the served model's frozen base weights.

The job's adapter is added to the served model under an internal name that no request can name
(`job-…`), so serving rows never run a half-trained adapter. It trains through the training core
(`training.loop.TrainingRun`) with the data, recipe, rates and schedule `unilora finetune` would
choose for the same file, method, seed and hyperparameters, and takes the same optimizer steps:
each step's batch is taken whole when the turn's token credit allows, else in parts of whole rows
whose gradients add up to the batch's (each part weighed by its share of the batch's target
tokens). Between parts the model is back in eval mode with its serving adapters untouched.

A job is advanced by the worker thread (cotraining.py) a piece at a time; a piece runs in slices
with the worker's serving turns between them (slices.py), in the job's own training state and the
turns in the server's.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..core.config import AdapterConfig
from ..core.errors import UniLoraError
from ..data.lm import LMDataset, read_lm_file
from ..data.lm_tokens import collate
from ..engine.distributed import transformer_blocks
from ..engine.model import AdaptedModel
from ..methods import recipe_config
from ..models.backbones import is_embedded
from ..training.causal_lm import CausalLMTask, token_loss_and_hits
from ..training.loop import TrainingRun, TrainSettings, fit_rates_to
from .slices import PieceAborted, SlicedPiece

MAX_LENGTH = 256  # tokens per example, as `unilora finetune --task causal-lm`
TRAINING_COST = 3  # a token trained costs about three read (forward, then backward through it)
RESUME_FILE = "resume.pt"


@dataclass
class JobRequest:
    """What a job was created with (a row of the job store, parsed)."""

    id: str
    seed: int
    epochs: int | None
    batch_size: int | None
    lr_multiplier: float | None
    adapter: dict  # AdapterConfig fields; "method" among them
    training_path: Path
    validation_path: Path | None

    def config(self, model_name: str) -> AdapterConfig:
        fields = dict(self.adapter)
        method = fields.pop("method", "unilora")
        targets = fields.pop("target_modules", "all-linear")
        return recipe_config(method, targets, modules_to_save=[], run_seed=self.seed,
                             tuned_model=is_embedded(model_name), **fields)


def stored_file(files_dir: Path, file_id: str) -> Path:
    """The one file kept in an uploaded file's folder (named as the client named it)."""
    return next((files_dir / file_id).iterdir())


def read_uploaded(path: Path) -> tuple[str, list[dict]]:
    """An uploaded file's rows; errors name the file as the client named it, never where it is kept."""
    try:
        return read_lm_file(path, "text")
    except UniLoraError as err:
        raise UniLoraError(str(err).replace(str(path), path.name)) from None


def read_dataset(request: JobRequest) -> LMDataset:
    """The job's rows: the whole training file (nothing held out) and the validation file's, if any."""
    kind, train = read_uploaded(request.training_path)
    test = []
    if request.validation_path is not None:
        test_kind, test = read_uploaded(request.validation_path)
        if test_kind != kind:
            raise UniLoraError(f"the validation file holds {test_kind} data and the training file {kind} data")
    source = {"data": str(request.training_path), "text_column": "text",
              "test_data": str(request.validation_path) if request.validation_path else None}
    return LMDataset(request.training_path.stem, kind, train, test, None, source)


class ServedTask(CausalLMTask):
    """The causal-LM task on the server's tokenizer and model; a job without a validation file
    evaluates nothing."""

    def prepare(self, tokenizer, lm, settings: TrainSettings) -> None:
        self.validated = self.needs_test_split = bool(self.dataset.test)
        super().prepare(tokenizer, lm, settings)


def _train_sets_flags(module: torch.nn.Module) -> bool:
    """Whether `module.train(mode)` sets `training` on it and its children and, where it does more,
    only what changes nothing here: transformers' PreTrainedModel.train also switches the mode of
    the hub kernels that replaced layers' forwards (see `_kernels_in_use`)."""
    train = type(module).train
    return train is torch.nn.Module.train or train.__qualname__ == "PreTrainedModel.train"


def _kernels_in_use(modules: list[torch.nn.Module]) -> bool:
    """Whether hub kernels replaced a layer's forward (the `kernels` package sets it on the instance).
    Where none did in inference mode, none does in training mode either: a training kernel serves
    inference too."""
    return any(hasattr(type(m), "kernel_layer_name") and "forward" in m.__dict__ for m in modules)


class ModeSwitch:
    """Train or eval mode, set on every module directly, around every piece and every serving turn at
    its stops: `model.train()` walks the modules a call each, and on a transformers model (hub kernels
    are on by default) asks the kernels to switch mode even where no kernel replaced anything: about
    5 ms a call on SmolLM2, and forwards after many switches ran slower. The modules are listed again
    when the model's adapters change; a model whose `train` does more than that gets `model.train(mode)`."""

    def __init__(self):
        self._listed: tuple[tuple, list, bool] | None = None  # (adapters, modules, whether flags are all)

    def set(self, model: AdaptedModel, training: bool) -> None:
        key = tuple(model.adapters)
        if self._listed is None or self._listed[0] != key:
            modules = list(model.modules())
            flags_only = all(_train_sets_flags(m) for m in modules) and not _kernels_in_use(modules)
            self._listed = (key, modules, flags_only)
        _, modules, flags_only = self._listed
        if not flags_only:
            model.train(training)
            return
        for module in modules:
            module.__dict__["training"] = training  # what nn.Module.__setattr__ does for it, without the checks


class JobRun:
    """A job's training state on the served model."""

    def __init__(self, request: JobRequest, task: ServedTask, settings: TrainSettings, model_name: str,
                 folder: Path):
        self.request = request
        self.task = task
        self.settings = settings
        self.model_name = model_name
        self.folder = folder  # the job's own folder in the server's state (its resume file)
        self.internal = f"job-{request.id}"
        self.model: AdaptedModel | None = None
        self.run: TrainingRun | None = None
        self.done_rows = 0  # rows of the step in progress already taken
        self.eval_rows: list[int] | None = None  # the evaluation's rows left, when evaluating
        self.eval_sum, self.eval_hits, self.eval_count = 0.0, 0, 0
        self.trained_tokens = 0
        self.rng = torch.Generator().manual_seed(request.seed).get_state()  # dropout's stream, the job's own
        self.step_rng = self.rng
        self.notes: list[str] = []
        self.epoch_ended: dict | None = None  # the history entry of an epoch just ended (the coordinator checkpoints it)
        self.blocks: list[torch.nn.Module] = []  # where a piece may stop between slices
        self.modes = ModeSwitch()
        self._server_state: tuple = (None, None)  # inside `training`: the server's active adapter and random state

    # --- attaching (worker thread) ------------------------------------------------------------------
    def attach(self, model: AdaptedModel) -> None:
        """Add the job's adapter to `model` and build the optimizer and schedule (fresh, or resumed)."""
        config = self.request.config(self.model_name)
        if self.internal not in model.adapters:
            model.add_adapter(self.internal, config)
        self.model = model
        try:
            self.blocks = transformer_blocks(model)
        except UniLoraError:  # blocks unknown: each piece runs whole
            self.blocks = []
        with self.training():
            settings = self.settings
            rates_note = fit_rates_to(model, settings, "hyperparameters.learning_rate_multiplier scales it")
            if rates_note:
                self.notes.append(rates_note)
            if self.request.lr_multiplier is not None:
                settings.lr *= self.request.lr_multiplier
                settings.group_lrs = {k: v * self.request.lr_multiplier for k, v in settings.group_lrs.items()}
            groups = model.parameter_groups(settings.lr, settings.group_lrs, settings.weight_decay)
            self.run = TrainingRun(model, self.task, settings, groups)
            self.run.report = lambda line: None  # the job's events say it
            resume = self.folder / RESUME_FILE
            if resume.exists():
                self._resume(resume)
            else:
                self.run.start_epoch()

    def detach(self) -> None:
        """Take the job's adapter off the served model (the model's last adapter stays, unused)."""
        model = self.model
        if model is not None and self.internal in model.adapters and len(model.adapters) > 1:
            model.delete_adapter(self.internal)
        self.model = None

    @contextlib.contextmanager
    def training(self, evaluating: bool = False):
        """The model as the job trains it (its adapter active, train mode, or eval mode for the
        evaluation, gradients on, the job's own random stream); as the server runs it again afterwards."""
        self._server_state = self._switch(self.internal, not evaluating, self.rng)
        try:
            with torch.enable_grad():
                yield
        finally:
            previous, server_rng = self._server_state
            _, self.rng = self._switch(previous, False, server_rng)

    @contextlib.contextmanager
    def paused_for_serving(self, evaluating: bool):
        """Inside `training`, between two slices of a piece: the model as the server runs it (its
        adapter, eval mode, its own random stream, no gradients), then the job's state again."""
        previous, server_rng = self._server_state
        _, job_rng = self._switch(previous, False, server_rng)
        try:
            with torch.no_grad():
                yield
        finally:
            self._server_state = self._switch(self.internal, not evaluating, job_rng)

    def _switch(self, adapter: str, training: bool, rng: torch.Tensor) -> tuple[str, torch.Tensor]:
        """`adapter` active (where the model still holds it), train or eval mode, torch's random state
        `rng`; returns the active adapter and random state it replaced."""
        model = self.model
        replaced = (model.active_adapter, torch.get_rng_state())
        if adapter in model.adapters:
            model.set_adapter(adapter)
        self.modes.set(model, training)
        torch.set_rng_state(rng)
        return replaced

    # --- one piece of work (worker thread) -------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.run.finished

    def next_cost(self) -> int:
        """Token credit the smallest next piece needs (one row)."""
        rows = self._rows_left()
        return self._cost(rows[:1]) if rows else 1

    def batch_cost(self) -> int:
        """Token credit for the rest of the step taken whole (`unilora finetune`'s own batch), or the next
        batch of evaluation rows."""
        return self._cost(self._rows_left()[: self.settings.batch_size]) or 1

    def run_piece(self, credit: float, grant: float,
                  between: Callable[[], float]) -> tuple[int, list[tuple[str, dict | None]]]:
        """Advance by the rows `credit` pays for (one row at least): part of a step, or of the epoch's
        evaluation, in slices (slices.py), the first `grant` long, with `between()` called at their
        stops in the server's own state. Returns (credit spent, events: (message, data)). A piece
        that `between` aborts leaves nothing (its rows are taken again) and raises PieceAborted."""
        rows = self._rows_left()
        take = 1
        while take < len(rows) and self._cost(rows[: take + 1]) <= credit:
            take += 1
        part = rows[:take]
        evaluating = self.eval_rows is not None
        events: list[tuple[str, dict | None]] = []
        work = (lambda: self._evaluate(part, events)) if evaluating else (lambda: self._train(part, events))
        passes = 1 if evaluating else TRAINING_COST
        piece = SlicedPiece(work, self.blocks, self._cost(part) // passes, passes)

        def serve_between() -> float:
            with self.paused_for_serving(evaluating):
                return between()

        rng = self.rng
        try:
            with self.training(evaluating):
                piece.run(grant, serve_between)
        except PieceAborted:
            self.rng = rng
            raise
        if not evaluating:  # the step's seconds, not the time the piece spent serving
            self.run.stepping -= piece.paused_seconds
        return self._cost(part), events

    def _rows_left(self) -> list[int]:
        if self.eval_rows is not None:
            return self.eval_rows
        return self.run.step_indices()[self.done_rows:]

    def _width(self, i: int) -> int:
        examples = self.task.test_examples if self.eval_rows is not None else self.task.train_examples
        return len(examples[i].input_ids)

    def _cost(self, rows: list[int]) -> int:
        width = max((self._width(i) for i in rows), default=0)
        return width * len(rows) * (1 if self.eval_rows is not None else TRAINING_COST)

    def _train(self, part: list[int], events: list) -> None:
        run = self.run
        step_rows = run.step_indices()
        if self.done_rows == 0:
            self.step_rng = self.rng
        share = 1.0 if len(part) == len(step_rows) else self.task.loss_terms(part) / self.task.loss_terms(step_rows)
        run.accumulate(part, share)
        self.trained_tokens += sum(len(self.task.train_examples[i].input_ids) for i in part)
        self.done_rows += len(part)
        if self.done_rows < len(step_rows):
            return
        loss = run.finish_step()
        self.done_rows = 0
        step = run.steps_done
        events.append((f"Step {step}/{run.total_steps}: training loss={loss:.4f}",
                       {"step": step, "train_loss": loss, "total_steps": run.total_steps}))
        if run.epoch_over:
            if self.task.validated:
                self.eval_rows = sorted(range(len(self.task.test_examples)), key=self._width)
                self.eval_sum, self.eval_hits, self.eval_count = 0.0, 0, 0
            else:
                self._end_epoch(None, events)

    def _evaluate(self, part: list[int], events: list) -> None:  # in eval mode (`training(evaluating=True)`)
        batch = collate([self.task.test_examples[i] for i in part], self.task.tokenizer.pad_token_id)
        with torch.no_grad():
            loss, hits, count = token_loss_and_hits(self.model, batch, self.task.keep_logits)
        self.eval_sum += loss
        self.eval_hits += hits
        self.eval_count += count
        self.eval_rows = self.eval_rows[len(part):]
        if not self.eval_rows:
            self.eval_rows = None
            count = max(1, self.eval_count)
            self._end_epoch((self.eval_sum / count, self.eval_hits / count), events)

    def _end_epoch(self, validation: tuple[float, float] | None, events: list) -> None:
        """`validation`: the whole validation file's (loss per target token, mean token accuracy)."""
        run = self.run
        entry = {"epoch": run.epoch, "train_loss": run.running, "train_seconds": round(run.stepping, 1)}
        data = {"step": run.steps_done, "epoch": run.epoch, "train_loss": run.running}
        message = f"Epoch {run.epoch}/{self.settings.epochs}: training loss={run.running:.4f}"
        if validation is not None:
            loss, accuracy = validation
            entry.update(eval_loss=loss, perplexity=math.exp(min(loss, 50.0)), eval_token_accuracy=accuracy)
            data.update(valid_loss=loss, valid_mean_token_accuracy=accuracy)
            message += f", validation loss={loss:.4f}, validation token accuracy={accuracy:.4f}"
        run.history.append(entry)
        events.append((message, data))
        run.end_epoch(evaluate=False)
        if not run.finished:
            run.start_epoch()
        self.epoch_ended = entry

    # --- saving --------------------------------------------------------------------------------------
    def save_adapter(self, directory: Path) -> None:
        """The adapter as `unilora finetune` writes it (with its task record), atomically."""
        record = {"task": "causal-lm", "model": self.model_name, "dataset": self.task.data_name, **self.task.record()}
        self.model.save_pretrained(directory, task=record, adapter_name=self.internal)

    def save_resume(self) -> None:
        """The state between two steps (a step in progress is taken again from its start), written
        atomically into the job's folder."""
        run = self.run
        evaluating = self.eval_rows is not None  # an evaluation in progress is run again whole
        theta = {k: v.detach().clone() for k, v in self.model.projections[self.internal].state_dict().items()}
        state = {"theta": theta, "run": run.state_dict(), "history": run.history,
                 "rng": self.step_rng if self.done_rows and not evaluating else self.rng,
                 "trained_tokens": self.trained_tokens, "evaluating": evaluating}
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = self.folder / f".{RESUME_FILE}.tmp-{os.getpid()}-{time.monotonic_ns()}"
        torch.save(state, staging)
        with open(staging, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(staging, self.folder / RESUME_FILE)

    def _resume(self, path: Path) -> None:
        try:
            state = torch.load(path, weights_only=True, map_location="cpu")
            projection = self.model.projections[self.internal]
            expected = projection.state_dict()
            theta = state["theta"]
            if set(theta) != set(expected) or any(theta[k].shape != expected[k].shape for k in expected):
                raise ValueError("its tensors do not match the job's adapter")
            if not all(torch.isfinite(t).all() for t in theta.values() if t.is_floating_point()):
                raise ValueError("it holds values that are not finite")
            projection.load_state_dict(theta)
            self.run.load_state_dict(state["run"])
            self.run.history = list(state["history"])
            self.rng = state["rng"]
            self.trained_tokens = int(state["trained_tokens"])
            if state.get("evaluating"):  # stopped during the evaluation: the epoch's steps are done
                self.eval_rows = sorted(range(len(self.task.test_examples)), key=self._width)
        except (KeyError, ValueError, TypeError, RuntimeError, OSError) as err:
            raise UniLoraError(f"the job's checkpoint {path.name} cannot be read ({err}); create the job again") from None
