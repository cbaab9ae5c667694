"""Run a function on several gloo ranks (CPU processes) with a deadline instead of a hang."""

import datetime
import faulthandler
import os
import sys
import time

import torch.distributed as dist
import torch.multiprocessing as mp

DEADLINE_S = 180


def init_gloo(rank: int, world: int, init_file: str) -> None:
    # a finite collective timeout: a lost peer becomes an error, never a silent hang
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def _run_then_exit(rank: int, fn, *args) -> None:
    """Run the rank's work (which ends with leave_rank()). An exception fails the rank as usual. A
    rank still running shortly before the deadline prints every thread's stack, so that a stall
    says where it is."""
    faulthandler.dump_traceback_later(DEADLINE_S - 20, exit=False)
    fn(rank, *args)
    leave_rank()


def leave_rank() -> None:
    """A rank's last call, from inside its work function: destroy the process group, then leave at
    once, without running the destructors of the rank's objects. Those have hung (a DDP rank stuck
    for minutes after destroy_process_group, its stack dump in _run_then_exit's call of the work
    function, i.e. while that function's locals were freed; twice in a dozen runs here) and
    aborted ("terminate called without an active exception", FSDP2, once in 10-50 runs). The
    rank's results are written by then."""
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, args, nprocs: int = 2, attempts: int = 2) -> None:
    """mp.spawn with a deadline. A run that hangs past it is killed and started once more
    (gloo on a loaded 2-core machine has been seen to stall); a failing rank fails at once."""
    for attempt in range(attempts):
        context = mp.start_processes(_run_then_exit, args=(fn, *args(attempt)), nprocs=nprocs, join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            if context.join(timeout=1):
                return
        for process in context.processes:
            process.kill()
    raise TimeoutError(f"{nprocs} gloo ranks did not finish within {DEADLINE_S} s, {attempts} times")
