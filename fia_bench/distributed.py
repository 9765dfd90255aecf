"""Sharded runs: ``torchrun`` or ``accelerate launch`` start one process per device and set
``RANK``/``WORLD_SIZE``; every process then walks the same sweep, generates its share of each
stage's missing image batches into the shared cache, and waits for the others before anything
reads them. What is not sharded (erasure, scoring, attacks, the report) runs on rank 0 alone:
the other ranks wait and receive its result, so every rank holds the same records and only rank
0 writes the run directory.

The images equal a single process's bit for bit (at the same CPU thread count, which changes
convolution rounding) because sharding hands out whole batches of the single-process batch list
(each image's noise comes from its own seed), never re-batches them.
Only small Python objects cross processes (batch lists, counts, results, error messages), so the
group always uses the gloo backend, on CPU and GPU alike."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from fia_bench.errors import FiaBenchError

T = TypeVar("T")

# Rank 0 may train an erasure for hours while the other ranks wait in their next collective call;
# a rank that dies still ends the others at once (gloo reports the closed connection).
TIMEOUT = datetime.timedelta(hours=72)


@contextlib.contextmanager
def session(device: str) -> Iterator[None]:
    """Be a rank of the group the launcher's environment describes (``WORLD_SIZE`` > 1) for the
    duration, on this rank's own GPU (``LOCAL_RANK`` modulo the visible GPUs, so ranks may share
    one). A group that already exists (started by the caller) is used and left alone. A rank
    that fails leaves at once, without waiting for ranks that are blocked in a collective call
    it will never make; they then fail on the closed connection instead of hanging."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", timeout=TIMEOUT)
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.barrier()
    dist.destroy_process_group()


def current() -> Group:
    """This process's place in the running group; a group of one outside a launcher."""
    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size())
    return Group()


@dataclass
class Group:
    rank: int = 0
    size: int = 1
    # set on rank 0 while it computes alone (``leader``): nested stages then run unsharded
    solo: bool = False
    dealt: int = 0  # items handed out by earlier ``shard`` calls, identical on every rank

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.size > 1 and not self.solo

    def shard(self, items: list[T]) -> list[T]:
        """This rank's items, dealt round-robin and continuing where the last call stopped, so
        many short lists still give every rank a near-equal share."""
        if not self.sharded:
            return items
        first = (self.rank - self.dealt) % self.size
        self.dealt += len(items)
        return items[first :: self.size]

    def from_main(self, make: Callable[[], T]) -> T:
        """``make()`` as computed on rank 0, on every rank: one view of the cache for all."""
        if not self.sharded:
            return make()
        return self._broadcast(make() if self.main else None)

    def gather(self, value: T) -> list[T]:
        """Every rank's value, in rank order; also the barrier after a sharded step."""
        if not self.sharded:
            return [value]
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def leader(self, compute: Callable[[], T], load: Callable[[], T] | None = None) -> T:
        """Run ``compute`` on rank 0 alone, unsharded; the other ranks wait and receive its
        result, or call ``load`` (a result too large to send, read back from the cache). An
        error on rank 0 stops every rank with one line."""
        if not self.sharded:
            return compute()
        if not self.main:
            failed, result = self._broadcast(None)
            if failed:
                raise FiaBenchError(f"rank 0 stopped the run: {result}")
            return load() if load else result
        self.solo = True
        try:
            result = compute()
        except Exception as err:
            self.solo = False
            self._broadcast((True, f"{type(err).__name__}: {err}"))
            raise
        self.solo = False
        self._broadcast((False, None if load else result))
        return result

    def _broadcast(self, value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
