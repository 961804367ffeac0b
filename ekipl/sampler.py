"""A resumable prompt sampler: a fresh seeded permutation per epoch, batches that cross epoch boundaries."""

from __future__ import annotations

import random


class PromptSampler:
    """Yields record indices in epoch-shuffled order; its state is two integers (epoch, position)."""

    def __init__(self, num_records: int, seed: int) -> None:
        if num_records < 1:
            raise ValueError("the training set is empty: check data.train_path (or data.synthetic_train)")
        self.num_records, self.seed = num_records, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.num_records))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self, size: int) -> list[int]:
        batch = []
        while len(batch) < size:
            if self.position == self.num_records:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(size - len(batch), self.num_records - self.position)
            batch.extend(self._order[self.position : self.position + take])
            self.position += take
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
