"""A training piece run in slices, with the streams served between them, so that no stream waits for a
whole piece.

A piece (forward and backward of a few rows of a job's step, or a batch of its evaluation) run whole
puts one long gap into every stream: on 2 CPU cores one 65-token row takes about 0.6 s forward and
backward, a decode step of 16 streams about 0.14 s. Here the piece stops at the boundaries of the
model's blocks (after a block's forward; before a block's backward, through a hook on the gradient of
the block's output) once it has spent the credit it was granted, and calls `between()` there, which
serves one worker turn (the forwards of the streams) and grants more credit; then it goes on from
where it stopped.

Everything runs on the worker's one thread, the piece's stack paused under the serving turn's: torch's
intra-op thread pool (OpenMP) belongs to the thread that calls it, and a second thread with a pool of
its own made libgomp stop spinning between parallel regions in both (it throttles once its threads
outnumber the cores): measured on 2 cores, a decode forward and a training slice taking turns across
two threads ran 1.25x to 1.5x and 1.1x to 1.45x slower than on one. The serving turn's forwards pass
the hooks by; `between` puts the server's state back around them (see JobRun.paused_for_serving).

An aborted piece (a cancelled job, a stopping server: `between` raises PieceAborted) unwinds from the
stop it is at, before its gradients reach the adapter (they reach it at the end of the backward), so
it leaves nothing behind and can be taken again from its start.

Credit: a piece of `tokens` padded tokens costs `tokens` per pass through the model; a block's forward
spends 1/L of one pass, its backward 2/L (a training piece costs 3 passes: training_job.TRAINING_COST).
The embeddings, the final norm, the head and the loss run inside whichever slice reaches them.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import torch
from torch import nn


class PieceAborted(Exception):
    """Raised at a stop to unwind the piece in progress (its job cancelled, the server stopping)."""


class SlicedPiece:
    def __init__(self, work: Callable[[], None], blocks: list[nn.Module], tokens: int, passes: int):
        """`work` runs the piece (its forward passes go through `blocks`); `passes`: 3 for forward and
        backward, 1 for a forward alone."""
        self.cost = tokens * passes
        self.spent = 0.0
        self.granted = 0.0
        self.done = False
        self.paused_seconds = 0.0  # time spent serving at stops (not the piece's own work)
        self._work = work
        self._blocks = blocks
        self._block_credit = tokens / max(1, len(blocks))
        self._between: Callable[[], float] = lambda: float("inf")
        self._thread: int | None = None
        self._serving = False

    def run(self, grant: float, between: Callable[[], float]) -> None:
        """Run the piece to its end on this thread. Once it has spent `grant`, it calls `between()` at
        the next block boundary: `between` serves and returns more credit (it is called again while the
        piece owes), or raises PieceAborted to unwind the piece. Raises what the piece raises."""
        self.granted, self._between, self._thread = grant, between, threading.get_ident()
        handles = [block.register_forward_hook(self._after_block) for block in self._blocks]
        try:
            self._work()
            self.spent = float(self.cost)
        finally:
            for handle in handles:
                handle.remove()
            self.done = True

    def _in_piece(self) -> bool:
        """The piece's own forward and backward, not a serving turn's forwards between its slices (nor
        another thread's)."""
        return not self._serving and threading.get_ident() == self._thread

    def _after_block(self, module, args, output):
        if not self._in_piece():
            return None
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(self._before_block_backward)
        self._stop(self._block_credit)
        return None

    def _before_block_backward(self, grad):
        if self._in_piece():  # CPU backward runs its hooks on the thread that called backward()
            self._stop(2 * self._block_credit)
        return None

    def _stop(self, credit: float) -> None:
        self.spent += credit
        while self.spent >= self.granted:
            self._serving = True
            started = time.perf_counter()
            try:
                self.granted += self._between()
            finally:
                self._serving = False
                self.paused_seconds += time.perf_counter() - started
