"""A training piece run in slices (serve/slices.py), the streams served at its stops on the same thread:
it stops at every block boundary of the forward and of the backward once its grant is spent, its
gradients equal the piece run whole, the forwards served at its stops see the model as if no piece
were in progress (and do not stop it themselves), and an aborted piece leaves nothing behind."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import unilora
from unilora.engine.distributed import transformer_blocks
from unilora.serve.slices import PieceAborted, SlicedPiece

LAYERS = 4
CONFIG = dict(method="unilora", target_modules=["q_proj", "v_proj", "up_proj"], rank=4, theta_dim=300, dropout=0.2,
              seed=3)


def served_model():
    """A tiny Llama with a job's adapter ("job", trained with dropout) and a served one ("other")."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=64))
    model = unilora.get_model(base, unilora.AdapterConfig(**CONFIG), adapter_name="job")
    model.add_adapter("other", unilora.AdapterConfig(**{**CONFIG, "seed": 4}))
    with torch.no_grad():
        for name in ("job", "other"):
            for p in model.projections[name].parameters():
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    model.eval()
    return model


BATCH = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
PROMPT = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(2))


def piece_loss(model) -> None:
    model(input_ids=BATCH, labels=BATCH).loss.backward()


@contextlib.contextmanager
def running_as(model, adapter: str, training: bool, rng: list):
    """`adapter` active, train or eval mode, on the random stream rng[0] (advanced in place); the
    model's adapter and mode as they were afterwards."""
    previous, was_training = model.active_adapter, model.training
    model.set_adapter(adapter)
    model.train(training)
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng[0])
        try:
            yield
        finally:
            rng[0] = torch.get_rng_state()
            model.train(was_training)
            model.set_adapter(previous)


def job_state(model, rng: list):
    """What the server's job wraps a piece in: its adapter, train mode, its own random stream."""
    return running_as(model, "job", True, rng)


def server_state(model, rng: list):
    """What the job puts back around a stop's serving turn (JobRun.paused_for_serving)."""
    return running_as(model, "other", False, rng)


def serve_once(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROMPT, adapter_names=["other", "__base__", "other"]).logits


def theta_grad(model) -> torch.Tensor:
    return next(model.projections["job"].parameters()).grad


def test_a_sliced_piece_stops_at_every_block_and_equals_the_piece_whole():
    whole = served_model()
    with job_state(whole, [torch.Generator().manual_seed(7).get_state()]):
        piece_loss(whole)
    expected_grad = theta_grad(whole).clone()
    served = serve_once(whole)

    model = served_model()
    blocks = transformer_blocks(model)
    assert len(blocks) == LAYERS
    tokens = BATCH.numel()
    piece = SlicedPiece(lambda: piece_loss(model), blocks, tokens, 3)
    torch.manual_seed(11)
    server_rng = [torch.get_rng_state()]
    stops = []

    def between() -> float:
        stops.append(piece.spent)
        assert theta_grad(model) is None  # the gradient reaches the adapter only at the end
        with server_state(model, server_rng):
            assert torch.equal(serve_once(model), served)  # its forwards pass the piece's hooks by
        return tokens / LAYERS  # one block's forward per grant

    with job_state(model, [torch.Generator().manual_seed(7).get_state()]):
        piece.run(tokens / LAYERS, between)
    # a stop after each block's forward and before each block's backward; a backward stop owes two
    # blocks' credit, so it serves two turns before the piece goes on
    assert len(set(stops)) == 2 * LAYERS and len(stops) == 3 * LAYERS
    assert stops == sorted(stops) and piece.done and piece.spent == piece.cost == 3 * tokens
    assert torch.equal(theta_grad(model), expected_grad)
    assert torch.equal(server_rng[0], torch.Generator().manual_seed(11).get_state())  # the server drew nothing,
    assert torch.equal(torch.get_rng_state(), server_rng[0])  # and the job's dropout drew from its own stream
    assert torch.equal(serve_once(model), served)


def test_an_aborted_piece_leaves_nothing_and_can_be_taken_again():
    model = served_model()
    blocks = transformer_blocks(model)
    tokens = BATCH.numel()
    for aborted_at in (1, LAYERS + 2):  # in the forward, then in the backward
        piece = SlicedPiece(lambda: piece_loss(model), blocks, tokens, 3)
        stops = []

        def between() -> float:
            stops.append(piece.spent)
            if len(stops) == aborted_at:
                raise PieceAborted("cancelled")
            return tokens / LAYERS

        with job_state(model, [torch.Generator().manual_seed(7).get_state()]):
            with pytest.raises(PieceAborted):
                piece.run(tokens / LAYERS, between)
        assert len(stops) == aborted_at and piece.done and theta_grad(model) is None
    again = SlicedPiece(lambda: piece_loss(model), blocks, tokens, 3)
    with job_state(model, [torch.Generator().manual_seed(7).get_state()]):
        again.run(float("inf"), lambda: pytest.fail("an unlimited grant never stops"))
    whole = served_model()
    with job_state(whole, [torch.Generator().manual_seed(7).get_state()]):
        piece_loss(whole)
    assert again.done and torch.equal(theta_grad(model), theta_grad(whole))


def test_an_error_in_the_piece_is_raised_by_run():
    model = served_model()

    def failing():
        model(input_ids=BATCH)
        raise ValueError("a bug in the piece")

    piece = SlicedPiece(failing, transformer_blocks(model), BATCH.numel(), 1)
    with pytest.raises(ValueError, match="a bug in the piece"):
        piece.run(1, lambda: 1)
    assert piece.done
    assert not any(block._forward_hooks for block in transformer_blocks(model))  # its hooks are gone
