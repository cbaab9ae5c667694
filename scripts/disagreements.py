"""Where a distilled classifier disagrees with its teacher on the held-out texts, and with whom it sides.

    python scripts/disagreements.py TEACHER_ADAPTER STUDENT_ADAPTER [DATA]

Both adapters are `unilora finetune` / `unilora compress` outputs on the same model; DATA (default:
the data the student records) gives the held-out texts and labels. Prints the number of texts on
which student and teacher disagree, who of the two is right there, and how often the student's
answer is the base model's (the base encoder with the teacher's head, the zero of the kept gain).
docs/results.md ("Compressing a LoRA by distillation") quotes it for the seeds 5-7 students.
"""

import sys

import torch

from unilora.training.classification import build_classifier, encode, predict_logits
from unilora.data.text import load_dataset
from unilora.training.teachers import teacher_from_adapter
from unilora.core.errors import UniLoraError


def main(teacher_dir: str, student_dir: str, data: str | None = None) -> None:
    tokenizer, teacher = teacher_from_adapter(teacher_dir)
    _, student = teacher_from_adapter(student_dir)  # any adapter of ours, merged into its base
    dataset = load_dataset(data or student.record["dataset"])  # the split every run uses (seed 0)
    texts = encode(tokenizer, dataset.test_texts, student.record["max_length"])
    labels = torch.tensor(dataset.test_labels)
    _, base = build_classifier(teacher.record["model"], len(teacher.record["label_names"]), 0)
    base.classifier.load_state_dict(teacher.head)
    with torch.no_grad():
        t, s, b = (predict_logits(m, tokenizer, texts, 128).argmax(-1) for m in (teacher.model, student.model, base))
    apart = s != t
    count = int(apart.sum())

    def share(mask) -> str:
        return f"{int(mask.sum())} ({100 * int(mask.sum()) / max(1, count):.0f} %)"

    print(f"{len(labels):,} held-out texts; student and teacher disagree on {count}: the teacher is right on "
          f"{share(apart & (t == labels))}, the student on {share(apart & (s == labels))}; the student's answer is "
          f"the base model's on {share(apart & (s == b))}")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    try:
        main(*sys.argv[1:])
    except UniLoraError as error:  # a wrong folder or data: one line, as the CLI gives it
        sys.exit(f"error: {error}")
