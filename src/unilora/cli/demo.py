"""`unilora demo`: train and evaluate a small adapter in a few CPU minutes, through the same library
calls as `unilora finetune`."""

from __future__ import annotations

from ..data.lm import bbc_headlines
from ..data.lm_tokens import prompt_ids
from ..data.sources import DataSpec
from ..engine.generation import generate
from ..models.backbones import load_causal_lm
from ..models.embedded_llm import EMBEDDED_LLM
from ..training.causal_lm import generate_from_adapter
from ..training.runs import run_finetune
from .commands import print_finetune


def cmd_demo(args) -> int:
    """A Rotten Tomatoes classifier on the embedded MiniLM, or (causal-lm) BBC News headlines on
    SmolLM2, showing a held-out article's headline before and after."""
    if args.task == "causal-lm":
        return demo_causal_lm(args.method, args.out, args.train_limit or 96, args.test_limit or 24)
    data = DataSpec("rotten_tomatoes", train_limit=args.train_limit or 3000, test_limit=args.test_limit or 1000)
    print_finetune(run_finetune(data, method=args.method, epochs=1, out=args.out, overwrite=True))
    return 0


def demo_causal_lm(method: str, out: str, train_limit: int, test_limit: int) -> int:
    held_out = bbc_headlines().test[-1]["messages"]  # from the test split: never trained on
    prompt, reference = held_out[0]["content"], held_out[1]["content"]
    tokenizer, lm = load_causal_lm(EMBEDDED_LLM)
    before = generate(lm, tokenizer, [prompt_ids(tokenizer, prompt, chat=True)], 24, 1)[0]
    del lm
    data = DataSpec("bbc_headlines", train_limit=train_limit, test_limit=test_limit)
    run = run_finetune(data, task="causal-lm", method=method, epochs=1, out=out, overwrite=True)
    print_finetune(run)
    after = generate_from_adapter(run.out / "adapter", [prompt], 24)[0]
    print(f"\nheld-out article: {prompt.split(chr(10))[-1][:200]}...")
    print(f"reference headline: {reference}")
    print(f"before training:    {before}")
    print(f"after training:     {after}")
    return 0
