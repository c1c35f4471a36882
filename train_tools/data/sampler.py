"""Batches of item indices, every batch within one bucket (one picture size): ``BucketBatchSampler`` for a
run's pictures, ``RegularisedBatchSampler`` when class pictures are mixed in, kohya-style."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from ..errors import UserError
from .items import DatasetItem


class BucketBatchSampler:
    """Batches of item indices in which every picture has the same size (its bucket).

    Each item appears ``repeats`` times per epoch; the order depends only on (seed, epoch), so a resumed run
    sees the same batches. Each repeat of a bucket is its own permutation, so an item rarely shares a batch
    with itself.
    """

    def __init__(
        self, items: Sequence[DatasetItem], batch_size: int, *, seed: int = 0, repeats: int = 1, shuffle: bool = True
    ) -> None:
        if batch_size < 1:
            raise UserError(f"Batch size must be at least 1; got {batch_size}.")
        if repeats < 1:
            raise UserError(f"Repeats must be at least 1; got {repeats}.")
        self.batch_size = batch_size
        self.seed = seed
        self.repeats = repeats
        self.shuffle = shuffle
        self.epoch = 0
        groups: dict[tuple[int, int], list[int]] = {}
        for index, item in enumerate(items):
            width, height = item.size
            groups.setdefault((width, height), []).append(index)
        self.buckets = [groups[size] for size in sorted(groups)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return sum(-(-len(b) * self.repeats // self.batch_size) for b in self.buckets)

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        batches: list[list[int]] = []
        for bucket in self.buckets:
            pool: list[int] = []
            for _ in range(self.repeats):
                order = list(bucket)
                if self.shuffle:
                    rng.shuffle(order)
                pool.extend(order)
            batches.extend(pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size))
        if self.shuffle:
            rng.shuffle(batches)
        return iter(batches)


class RegularisedBatchSampler:
    """Batches of training and regularisation (class) items, every batch within one bucket.

    ``items`` holds the training items first (``n_train`` of them), then the class items. Each epoch sees every
    training item ``repeats`` times plus as many class items (kohya repeats the class pictures to match the
    training pictures x repeats): they are drawn in turn from one seeded order of the class pictures, each epoch
    going on where the last one stopped, so a large class set is used evenly over the run and a small one is
    repeated. The order depends only on (seed, epoch), so a resumed run sees the same batches. Where the drawn
    class pictures fall into other buckets, an epoch may hold a batch more or less than the one before.
    """

    def __init__(
        self, items: Sequence[DatasetItem], n_train: int, batch_size: int, *, seed: int = 0, repeats: int = 1
    ) -> None:
        if batch_size < 1:
            raise UserError(f"Batch size must be at least 1; got {batch_size}.")
        if repeats < 1:
            raise UserError(f"Repeats must be at least 1; got {repeats}.")
        if not 0 < n_train < len(items):
            raise ValueError("RegularisedBatchSampler needs training items and class items.")
        self.batch_size, self.seed, self.repeats, self.n_train = batch_size, seed, repeats, n_train
        self.epoch = 0
        self.sizes = [tuple(item.size) for item in items]
        self.buckets = sorted(set(self.sizes))
        self.train_buckets: dict[tuple[int, ...], list[int]] = {}
        for index in range(n_train):
            self.train_buckets.setdefault(self.sizes[index], []).append(index)
        self.reg_order = list(range(n_train, len(items)))
        random.Random(f"{seed}:class-pictures").shuffle(self.reg_order)
        self.per_epoch = n_train * repeats  # class items per epoch
        # _prefix[size][i]: how many of reg_order[:i] are of that bucket (counts per epoch without drawing).
        self._prefix: dict[tuple[int, ...], list[int]] = {size: [0] for size in self.buckets}
        for index in self.reg_order:
            for size, prefix in self._prefix.items():
                prefix.append(prefix[-1] + (self.sizes[index] == size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def reg_draws(self, epoch: int) -> list[int]:
        """The class items of ``epoch`` (1-based), in the order drawn."""
        n = len(self.reg_order)
        start = (epoch - 1) * self.per_epoch % n
        return [self.reg_order[(start + k) % n] for k in range(self.per_epoch)]

    def _reg_counts(self, epoch: int) -> dict[tuple[int, ...], int]:
        n = len(self.reg_order)
        start = (epoch - 1) * self.per_epoch % n
        laps, rest = divmod(self.per_epoch, n)
        counts = {}
        for size, prefix in self._prefix.items():
            end = start + rest
            part = prefix[end] - prefix[start] if end <= n else prefix[n] - prefix[start] + prefix[end - n]
            counts[size] = laps * prefix[n] + part
        return counts

    def batch_count(self, epoch: int) -> int:
        """How many batches ``epoch`` has (without drawing them)."""
        reg = self._reg_counts(epoch)
        return sum(
            -(-(len(self.train_buckets.get(size, [])) * self.repeats + reg[size]) // self.batch_size)
            for size in self.buckets
        )

    def __len__(self) -> int:
        return self.batch_count(self.epoch)

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        reg: dict[tuple[int, ...], list[int]] = {}
        for index in self.reg_draws(self.epoch):
            reg.setdefault(self.sizes[index], []).append(index)
        batches: list[list[int]] = []
        for size in self.buckets:
            train: list[int] = []
            for _ in range(self.repeats):  # each repeat its own permutation, as BucketBatchSampler does
                order = list(self.train_buckets.get(size, []))
                rng.shuffle(order)
                train.extend(order)
            pool = _riffle(train, reg.get(size, []), rng)
            batches.extend(pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size))
        rng.shuffle(batches)
        return iter(batches)


def _riffle(first: list[int], second: list[int], rng: random.Random) -> list[int]:
    """A random interleaving of two lists that keeps the order within each (every interleaving equally likely)."""
    out: list[int] = []
    i = j = 0
    while i < len(first) or j < len(second):
        left = len(first) - i
        if rng.randrange(left + len(second) - j) < left:
            out.append(first[i])
            i += 1
        else:
            out.append(second[j])
            j += 1
    return out
