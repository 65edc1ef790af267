"""The collective stage of app-primes-mpi: every rank counts the primes of its share of
[1, NUM_GROUPS*LENGTH] (numbers spread round-robin over the ranks), an allreduce adds them up."""

from __future__ import annotations

import math
import os

from scalebox_hpc import mpi


def is_prime(n: int) -> bool:
    """Trial division (the ranges here are small)."""
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def count(task: mpi.MpiTask) -> int:
    """Count on every rank; rank 0 sends the total on to scatter."""
    last = int(os.environ["NUM_GROUPS"]) * int(os.environ["LENGTH"])
    mine = sum(1 for n in range(1 + task.rank, last + 1, task.size) if is_prime(n))
    total = task.comm.allreduce(mine)
    if task.rank == 0:
        print(f"total: {total} primes in [1, {last}] on {task.size} ranks")
        task.send_message(task.body, headers={"total": total})
    return 0
