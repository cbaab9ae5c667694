"""`unilora compress --adapter / --data`: distil a model into a compact adapter by its behaviour.

A weight-space fit (tools/compress.py) keeps about 1 % of a LoRA update at the sizes that make Uni-LoRA
worth having: most directions of ΔW cannot be expressed with d << D numbers, and the fit spends
them evenly, whether a direction matters for the outputs or not. Here the source model is the
teacher and the compact adapter is trained to give its outputs on texts the user gives, without
labels, starting from the weight-space fit: KL divergence of the softened class probabilities
(a classifier, whose trained head is carried over unchanged, so the student is used like any
adapter) or of the next-token distributions at every position that carries a loss (a causal LM).

The teachers come from teachers.py (an adapter of ours, a PEFT LoRA, a full fine-tune); the loop is
the shared one (loop.train) with its run plan; distill_run.py is the command's library call.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ..core.config import AdapterConfig
from ..core.errors import UniLoraError
from ..core.notes import note
from ..data.lm import LMDataset
from ..data.lm_tokens import IGNORE
from ..data.lm_tokens import collate as lm_collate
from ..data.text import TextDataset
from ..engine.layers import AdaptedLayer
from ..engine.model import AdaptedModel, get_model
from ..models.backbones import load_causal_lm
from ..tools.compress import compress
from .causal_lm import CausalLMTask, batches_by_length, score_generations
from .classification import build_classifier, collate, encode, predict, predict_logits
from .gain import kept_gain, kept_gain_interval
from .loop import Task, TrainSettings, fit_rates_to, fitted_max_length, train
from .plan import LM_BATCH_SIZE, plan_run
from .recipes import DEFAULT_HIDDEN_LAYERS, HIDDEN_LAYERS
from .teacher_outputs import CACHE_BUDGET_BYTES, TeacherCache, stored
from .teachers import HEAD_MODULE, Teacher

# The default softening, per teacher kind. A classifier: against 2, students at 1 ended closer to
# the teacher in held-out KL in 10 of 12 runs (Rotten Tomatoes, BBC News), against 0.5 in 6 of 6
# (Uni-LoRA, seeds 5-7). A causal LM: at 1 the SmolLM2 students (seed 1) ended at KL 0.18 / 0.20
# against 0.13 at 2 (docs/results.md).
TEMPERATURE = {"seq-cls": 1.0, "causal-lm": 2.0}
# The default weight of matching a classifier's pooled features beside the logits' KL: at 1, on
# seeds kept apart from the reported ones (5-7), held-out KL to the teacher fell in 12 of 12 runs at
# the same cost. A causal LM matches its next-token distributions only.
HIDDEN_WEIGHT = {"seq-cls": 1.0, "causal-lm": 0.0}


def kl_per_row(student: torch.Tensor, teacher: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """KL(teacher || student) of the distributions in each row of two logit tensors: 0 when the
    outputs are the same. Mean over rows ("batchmean") or their sum ("sum")."""
    return F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction=reduction)


def softened_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The distillation loss: KL per row at a temperature, scaled by its square so that the
    gradients keep their size across temperatures."""
    return kl_per_row(student / temperature, teacher / temperature) * temperature**2


def student_train_mode(student: AdaptedModel) -> None:
    """Training mode for the adapter only: the frozen base model (every module of it but the adapted
    layers, whose own dropout stays) runs as at inference, without dropout. The teacher's targets are
    its outputs without dropout; with the base's dropout on, a student equal to its teacher would
    still have a loss and a gradient, pulling it away from the outputs it is scored on (turned off,
    held-out KL to the teacher fell in 11 of 12 runs on seeds 5-7, docs/results.md). Distillation
    trains without gradient checkpointing, which transformers skips outside training mode."""
    student.train()
    for module in student.model.modules():
        if not isinstance(module, AdaptedLayer):
            module.training = False


def layers_to_match(requested: str | None, texts: int, encoder_config, budget: int = CACHE_BUDGET_BYTES) -> str:
    """The layers whose pooled features a classifier student matches: `requested`, else the default.
    The teacher's features of every layer are kept for every training text (float32); where they
    would not fit in `budget`, the default falls back to the head's input alone, with a note, and an
    explicit "all" is refused before anything is computed."""
    chosen = requested or DEFAULT_HIDDEN_LAYERS
    layers, hidden = getattr(encoder_config, "num_hidden_layers", None), getattr(encoder_config, "hidden_size", None)
    if chosen != "all" or not isinstance(layers, int) or not isinstance(hidden, int):
        return chosen
    size = texts * layers * hidden * 4
    if size <= budget:
        return chosen
    what = (f"the teacher's pooled features of its {layers} layers for {texts:,} training texts would take "
            f"{size / 2**30:.1f} GiB, over the {budget / 2**30:.1f} GiB kept for them")
    if requested:
        raise UniLoraError(f"{what}: give fewer texts (--train-limit) or pass --hidden-layers last")
    note(f"{what}, so only the head's input is matched (--hidden-layers last)")
    return "last"


def feature_scale(features: torch.Tensor) -> torch.Tensor:
    """The unit of the squared error of each matched layer (features: texts x layers x hidden): the
    variance of its features over the texts, averaged over the features. Texts whose features do not
    vary (a single text) have none; their mean square is the unit then, so the error stays finite."""
    variance = features.var(0, unbiased=False).mean(-1)
    square = features.pow(2).mean((0, 2)).clamp_min(1e-12)
    return torch.where(variance > 1e-6 * square, variance, square)


class DistillTask(Task):
    """Match the teacher's class probabilities on unlabelled texts; score agreement (and accuracy
    where the held-out texts have labels)."""

    kind = "seq-cls"

    def __init__(self, teacher: Teacher, tokenizer, dataset: TextDataset, max_length: int, temperature: float = 2.0,
                 hidden_weight: float = 0.0, hidden_layers: str = "last"):
        self.teacher, self.tokenizer, self.temperature = teacher, tokenizer, temperature
        # with a weight > 0 the student also matches the teacher's pooled features, the head's
        # input: hundreds of numbers per text where the logits give one less than the classes;
        # with hidden_layers "all", every encoder layer's, so each layer's adapter has a target of its own
        self.hidden_weight, self.every_layer = hidden_weight, hidden_layers == "all" and hidden_weight > 0
        self.data_name, self.max_length = dataset.name, max_length
        self.train_examples = encode(tokenizer, dataset.train_texts, max_length)
        self.test_examples = encode(tokenizer, dataset.test_texts, max_length)
        self.test_labels = dataset.test_labels
        self.teacher_test = self._logits(teacher.model, self.test_examples)
        # The teacher is frozen and runs without dropout, so its logits for a training text are the
        # same every epoch: computed in one pass at the first batch (inside the training time), in
        # batches of similar length (RT 2,000: 58k tokens with padding against 105k in shuffled
        # batches of 32), and read from here after that.
        self.teacher_train: torch.Tensor | None = None
        self.teacher_pooled: torch.Tensor | None = None  # texts x layers matched x hidden
        self.pooled_variance: torch.Tensor | None = None  # per layer matched: of its features over the texts
        self.teacher_pass_seconds = 0.0
        # the last evaluation's score per held-out text, of the model scored and of the teacher
        # (gain.py), per measure: accuracy (1 or 0 a text) first, then minus the text's eval loss on
        # its label, a finer measure of the same gain; None without labels
        self.text_scores: dict[str, dict[str, torch.Tensor]] | None = None

    def batch(self, indices: list[int]) -> dict:
        if self.teacher_train is None:
            started = time.time()
            self.teacher_train, pooled = predict(self.teacher.model, self.tokenizer, self.train_examples, 128,
                                                 self.every_layer)
            self.teacher_pooled = pooled if self.every_layer else pooled.unsqueeze(1)
            self.pooled_variance = feature_scale(self.teacher_pooled)
            self.teacher_pass_seconds = time.time() - started
        inputs = collate(self.tokenizer, [self.train_examples[i] for i in indices])
        if self.every_layer:
            inputs["output_hidden_states"] = True
        return {"inputs": inputs, "teacher": self.teacher_train[indices], "pooled": self.teacher_pooled[indices]}

    def train_mode(self, model) -> None:
        student_train_mode(model)

    def loss(self, model, batch: dict) -> torch.Tensor:
        out = model(**batch["inputs"])
        loss = softened_kl(out.logits.float(), batch["teacher"], self.temperature)
        if self.hidden_weight:  # per layer matched, mean squared error per feature in units of its variance
            pooled = out.layer_pooled if self.every_layer else out.pooled.unsqueeze(1)
            error = (pooled.float() - batch["pooled"]).pow(2).mean((0, 2)) / self.pooled_variance
            # the head's input keeps its full weight; the inner layers share one more, whatever the depth
            inner = error[:-1].mean() if len(error) > 1 else 0.0
            loss = loss + self.hidden_weight * (error[-1] + inner)
        return loss

    def _logits(self, model, examples: list[list[int]]) -> torch.Tensor:
        if not examples:
            raise UniLoraError("the held-out split holds no text to compare teacher and student on")
        return predict_logits(model, self.tokenizer, examples, 128)

    def evaluate(self, model, final: bool) -> dict:
        logits = self._logits(model, self.test_examples)
        predicted, teacher = logits.argmax(-1), self.teacher_test.argmax(-1)
        kl = kl_per_row(logits, self.teacher_test)  # at temperature 1, nats per text
        result = {"agreement": float((predicted == teacher).float().mean()), "kl_to_teacher": float(kl)}
        if self.test_labels:
            labels = torch.tensor(self.test_labels)
            loss, teacher_loss = (F.cross_entropy(rows, labels, reduction="none").double()
                                  for rows in (logits, self.teacher_test))
            self.text_scores = {"accuracy": {"model": (predicted == labels).float(), "teacher": (teacher == labels).float()},
                                "eval_loss": {"model": -loss, "teacher": -teacher_loss}}
            result["student_accuracy"] = float(self.text_scores["accuracy"]["model"].mean())
            result["teacher_accuracy"] = float(self.text_scores["accuracy"]["teacher"].mean())
            result["eval_loss"], result["teacher_eval_loss"] = float(loss.mean()), float(teacher_loss.mean())
        return result

    def record(self) -> dict:
        return {"max_length": self.max_length}

    def summary(self, result: dict) -> str:
        text = f"agreement with the teacher {result['agreement']:.4f} (KL {result['kl_to_teacher']:.2e})"
        if "student_accuracy" in result:
            text += f", accuracy {result['student_accuracy']:.4f} (teacher {result['teacher_accuracy']:.4f})"
        return text


class LMDistillTask(CausalLMTask):
    """Match the teacher's next-token distributions at every position that carries a loss (the
    completion, the assistant turns, or every token of plain text); score the eval loss, the
    agreement of the most likely next token and the KL, teacher beside student. The teacher runs
    once per text (teacher_outputs): over the training texts at the first batch, over the held-out
    texts at the first evaluation."""

    def __init__(self, teacher: Teacher, tokenizer, dataset: LMDataset, settings: TrainSettings,
                 temperature: float = 2.0, budget: int = CACHE_BUDGET_BYTES):
        super().__init__(dataset)
        self.teacher, self.temperature = teacher, temperature
        self.prepare(tokenizer, teacher.model, settings)
        self.budget = budget
        self.teacher_train: TeacherCache | None = None  # filled at the first batch (inside the training time)
        self.teacher_test = TeacherCache(budget)  # per evaluation batch, at temperature 1
        self.teacher_top: list[torch.Tensor] = []  # per evaluation batch
        self.teacher_test_loss = 0.0
        self.teacher_text_losses: list[torch.Tensor] = []  # per evaluation batch, one summed loss per text
        self.text_scores: dict[str, dict[str, torch.Tensor]] | None = None  # as DistillTask's, eval loss only
        self.teacher_metric: float | None = None  # the teacher's score on generations, once
        self.teacher_pass_seconds = 0.0

    def train_mode(self, model) -> None:
        student_train_mode(model)

    def _target_logits(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(float logits, target token) of every position that predicts a target, one row each:
        row-major, so a text's rows are consecutive and in order."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        targets = F.pad(batch["labels"], (0, 1), value=IGNORE)[:, 1:]  # position t predicts token t + 1
        if self.keep_logits:  # the vocabulary projection only where a target is predicted
            keep = (targets != IGNORE).any(0).nonzero().squeeze(1)
            logits, targets = model(**inputs, logits_to_keep=keep).logits, targets[:, keep]
        else:
            logits = model(**inputs).logits
        mask = targets != IGNORE
        return logits[mask].float(), targets[mask]

    def _by_length(self, examples: list) -> list[tuple[list[int], dict]]:
        return batches_by_length(examples, self.tokenizer.pad_token_id, self.eval_batch_size())

    @torch.no_grad()
    def _teacher_per_text(self, batch: dict) -> list[torch.Tensor]:
        """The teacher's stored log-probabilities (at the distillation temperature) at each text's
        loss positions, one tensor per text of `batch`."""
        logits, _ = self._target_logits(self.teacher.model, batch)
        counts = (batch["labels"][:, 1:] != IGNORE).sum(1).tolist()
        return list(stored(logits, self.temperature).split(counts))

    def batch(self, indices: list[int]) -> dict:
        if self.teacher_train is None:  # one pass over the training texts, until the budget is spent
            started, self.teacher_train = time.time(), TeacherCache(self.budget)
            for texts, batch in self._by_length(self.train_examples):
                if not all(map(self.teacher_train.add, texts, self._teacher_per_text(batch))):
                    break  # full: the texts left run through the teacher in their training batches
            self.teacher_pass_seconds = time.time() - started
        inputs = lm_collate([self.train_examples[i] for i in indices], self.tokenizer.pad_token_id)
        fresh = {}
        missing = self.teacher_train.missing(indices)
        if missing:
            sub = inputs if len(missing) == len(indices) else \
                lm_collate([self.train_examples[i] for i in missing], self.tokenizer.pad_token_id)
            fresh = dict(zip(missing, self._teacher_per_text(sub)))
        teacher = torch.cat([fresh[i] if i in fresh else self.teacher_train.get(i) for i in indices])
        return {"inputs": inputs, "teacher": teacher}

    def loss(self, model, batch: dict) -> torch.Tensor:
        student, _ = self._target_logits(model, batch["inputs"])
        teacher = batch["teacher"].float()  # log-probabilities at the temperature: renormalised by kl_per_row
        return kl_per_row(student / self.temperature, teacher) * self.temperature**2

    @torch.no_grad()
    def _teacher_on_test(self, number: int, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's log-probabilities (temperature 1) and most likely next tokens on evaluation
        batch `number`: the first evaluation computes them all, adds up the teacher's loss and keeps
        what fits (its top tokens are taken before rounding, and always kept: 8 bytes a position)."""
        if number in self.teacher_test.entries:
            return self.teacher_test.get(number).float(), self.teacher_top[number]
        logits, targets = self._target_logits(self.teacher.model, batch)
        if number == len(self.teacher_top):  # the first evaluation
            self.teacher_text_losses.append(_per_text_loss(logits, targets, batch))
            self.teacher_test_loss += float(self.teacher_text_losses[-1].sum())
            self.teacher_top.append(logits.argmax(-1))
            self.teacher_test.add(number, stored(logits))
        return stored(logits).float(), self.teacher_top[number]

    @torch.no_grad()
    def evaluate(self, model, final: bool) -> dict:
        model.eval()
        kl = agree = count = 0.0
        text_losses = []
        for number, (_, batch) in enumerate(self._by_length(self.test_examples)):
            teacher, teacher_top = self._teacher_on_test(number, batch)
            student, targets = self._target_logits(model, batch)
            text_losses.append(_per_text_loss(student, targets, batch))
            kl += float(kl_per_row(student, teacher, "sum"))
            agree += float((student.argmax(-1) == teacher_top).sum())
            count += len(targets)
        self.text_scores = {"eval_loss": {"model": -torch.cat(text_losses), "teacher": -torch.cat(self.teacher_text_losses)}}
        loss, count = float(-self.text_scores["eval_loss"]["model"].sum()), max(1.0, count)
        result = {"agreement": agree / count, "kl_to_teacher": kl / count, "eval_loss": loss / count,
                  "perplexity": math.exp(min(loss / count, 50.0)), "teacher_eval_loss": self.teacher_test_loss / count}
        metric = self.dataset.metric
        if final and metric:
            result.update(self._scored_generations(model))
            if self.teacher_metric is None:
                self.teacher_metric = self._scored_generations(self.teacher.model)[metric]
            result[f"teacher_{metric}"] = self.teacher_metric
        return result

    def _scored_generations(self, model) -> dict:
        return score_generations(model, self.tokenizer, self.dataset, self.max_length, self.eval_batch_size(),
                                 self.settings.max_new_tokens)

    def summary(self, result: dict) -> str:
        text = (f"agreement with the teacher {result['agreement']:.4f} (KL {result['kl_to_teacher']:.2e}), "
                f"eval loss {result['eval_loss']:.4f} (teacher {result['teacher_eval_loss']:.4f})")
        metric = self.dataset.metric
        if metric in result:
            text += f", {metric} {result[metric]:.4f} (teacher {result[f'teacher_{metric}']:.4f})"
        return text


def _per_text_loss(logits: torch.Tensor, targets: torch.Tensor, batch: dict) -> torch.Tensor:
    """The summed loss of each text of `batch`, from its rows of `_target_logits` (row-major)."""
    counts = (batch["labels"][:, 1:] != IGNORE).sum(1).tolist()
    losses = F.cross_entropy(logits, targets, reduction="none").double()
    return torch.stack([part.sum() for part in losses.split(counts)])


def distill(teacher: Teacher, tokenizer, config: AdapterConfig, dataset: TextDataset | LMDataset,
            settings: TrainSettings, fit_steps: int = 0, temperature: float | None = None,
            hidden_weight: float | None = None, fit_lr: float = 1e-3, hidden_layers: str | None = None):
    """The compact adapter trained to match `teacher` (at `temperature`, a classifier also its pooled
    features with `hidden_weight`, of the layers `hidden_layers` names; None: the kind's default).
    Returns (student model, report)."""
    causal = teacher.kind == "causal-lm"
    temperature = temperature or TEMPERATURE[teacher.kind]
    hidden_weight = HIDDEN_WEIGHT[teacher.kind] if hidden_weight is None else hidden_weight
    if causal and (hidden_weight or hidden_layers):
        raise UniLoraError("--hidden-weight and --hidden-layers match a classifier's pooled features; a causal LM "
                           "student matches its teacher's next-token distributions only: leave them out")
    if hidden_layers not in (None, *HIDDEN_LAYERS):
        raise UniLoraError(f"--hidden-layers is one of {', '.join(HIDDEN_LAYERS)}, not '{hidden_layers}'")
    if hidden_layers and not hidden_weight:
        raise UniLoraError("--hidden-layers chooses the features that --hidden-weight matches, and the weight is 0")
    if causal != isinstance(dataset, LMDataset):
        raise UniLoraError(f"a {teacher.kind} teacher is matched on "
                           f"{'text, prompt/completion or chat data' if causal else 'texts to classify'}, "
                           f"and '{dataset.name}' is not that")
    names = [u.name for u in teacher.updates]
    config = AdapterConfig(**{**config.to_dict(), "target_modules": names,
                              "modules_to_save": [] if causal else [HEAD_MODULE]})
    if causal:
        _, model = load_causal_lm(teacher.record["model"])
        task = LMDistillTask(teacher, tokenizer, dataset, settings, temperature)
    else:
        _, model = build_classifier(teacher.record["model"], len(teacher.record["label_names"]), 0)
        max_length = fitted_max_length(settings.max_length, tokenizer, model.encoder)
        hidden_layers = layers_to_match(hidden_layers, len(dataset.train_texts), model.encoder.config) \
            if hidden_weight else "last"
        task = DistillTask(teacher, tokenizer, dataset, max_length, temperature, hidden_weight, hidden_layers)
        with torch.no_grad():
            model.classifier.load_state_dict(teacher.head)  # on the base encoder: the gain's zero
    chosen = plan_run(settings, task.kind, task.train_size(),
                      lengths=[task.train_length(i) for i in range(task.train_size())], distill=True)
    if chosen:
        note(f"{'; '.join(chosen.values())} (--epochs, --batch-size and --group-by-length set them)")
    if causal and "batch_size" in chosen:
        # the plan's small batches buy optimizer steps, not memory: the teacher's pass, the
        # evaluations and the generations run in finetune's batches
        task.no_grad_batch_size = LM_BATCH_SIZE
    base = task.evaluate(model, final=False)
    base_scores = task.text_scores
    torch.manual_seed(settings.seed)
    student = get_model(model, config)
    order = {slot.name: i for i, slot in enumerate(student.layout.slots)}
    updates = sorted(teacher.updates, key=lambda u: order[u.name])  # the fit's layout = the student's
    fitted, layout, fit_report = compress(updates, student.projection.config, steps=fit_steps, lr=fit_lr)
    assert layout.slots == student.layout.slots, "the weight-space fit must share the student's layout"
    student.projection.load_state_dict(fitted.state_dict())
    if not causal:
        _carry_head(student, teacher.head)
    before = task.evaluate(student, final=False)
    rates = fit_rates_to(student, settings)
    if rates:
        note(rates)
    groups = [g for g in student.parameter_groups(settings.lr, settings.group_lrs) if g.get("name") != "head"]
    for p in student.head_parameters().values():
        p.requires_grad_(False)  # the teacher's head, carried as it is
    history = train(student, task, settings, groups)
    after = history[-1]
    report = {"weight_space": fit_report, "base": base, "temperature": temperature, "hidden_weight": hidden_weight,
              "hidden_layers": None if causal or not hidden_weight else hidden_layers,
              "teacher_pass_seconds": task.teacher_pass_seconds, "before": before, "after": after, "history": history,
              "max_length": task.max_length, "plan": chosen, "record": task.record(),
              "test_examples": task.test_size()}
    report["kept_gain_by_measure"] = _kept_gains(base_scores, task.text_scores)
    # the first measure is the headline: a classifier's accuracy, a causal LM's eval loss
    headline = next(iter(report["kept_gain_by_measure"].values()), {"kept": None, "interval": None})
    report["kept_gain"], report["kept_gain_interval"] = headline["kept"], headline["interval"]
    return student.eval(), report


def _kept_gains(base: dict | None, last: dict | None) -> dict[str, dict]:
    """Per measure of the held-out texts (a classifier's accuracy and eval loss on its labels, a
    causal LM's eval loss), the share of the teacher's gain over the base model that the student
    has and its interval over the texts; empty where there is nothing to score, None where the
    teacher gained nothing."""
    if base is None or last is None:
        return {}
    gains = {}
    for measure, scores in last.items():
        triple = base[measure]["model"], scores["teacher"], scores["model"]
        kept = kept_gain(*triple)
        gains[measure] = {"kept": kept,
                          "interval": kept_gain_interval(*triple) if kept is not None and len(triple[0]) > 1 else None}
    return gains


def _carry_head(student: AdaptedModel, head: dict[str, torch.Tensor]) -> None:
    params = student.head_parameters()
    with torch.no_grad():
        for key, value in head.items():
            param = params.get(f"{HEAD_MODULE}.{key}")
            if param is None or param.shape != value.shape:
                raise UniLoraError(f"the teacher's head tensor '{key}' {tuple(value.shape)} has no match in the student")
            param.copy_(value)
