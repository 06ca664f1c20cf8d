"""Training streams a store larger than its memory budget (issue 26): never more than
``TrainConfig.max_resident_shards`` shards resident, every shard read once per epoch, every step taken."""
import json
import weakref

import pytest
import torch

from saeuron.store import ActivationStore
from saeuron.trainer import TrainConfig, train

SHARDS, ROWS, D = 24, 64, 16


def make_store(root) -> ActivationStore:
    """24 shards of 64 rows of width 16 (sums of sparse atoms); row ids in ``timestep`` to trace coverage."""
    g = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(32, D, generator=g), dim=1)
    store = ActivationStore.create(root, {"hp": D}, ["p"])
    for b in range(SHARDS):
        codes = torch.rand(ROWS, 32, generator=g) * (torch.rand(ROWS, 32, generator=g) < 0.1)
        store.write_batch(b, {"hp": {"x": codes @ atoms + 0.01 * torch.randn(ROWS, D, generator=g),
                                     "timestep": torch.arange(b * ROWS, (b + 1) * ROWS, dtype=torch.float32),
                                     "prompt_id": torch.zeros(ROWS, dtype=torch.long)}})
    store.close()
    return ActivationStore(root)


class ResidentCounter:
    """Counts the shards whose rows are alive: each buffer the reader fills adds its shards, and they count
    until the buffer's tensor is freed (a batch that were a view of it would keep it alive, and counted)."""

    def __init__(self, store):
        self.live = self.peak = 0
        self.reads, self.at_batches = [], []
        real_read, real_iter = store._read_group, store.iter_batches

        def read_group(group, d):
            buf = real_read(group, d)
            self.live += len(group)
            weakref.finalize(buf["x"], self._freed, len(group))
            self.peak = max(self.peak, self.live)
            self.reads += group
            return buf

        def iter_batches(*args, **kwargs):
            for batch in real_iter(*args, **kwargs):
                self.at_batches.append(self.live)
                yield batch

        store._read_group, store.iter_batches = read_group, iter_batches

    def _freed(self, n):
        self.live -= n


def test_training_holds_at_most_max_resident_shards(tmp_path):
    store = make_store(tmp_path / "store")
    budget = 2  # the store is 12 times the budget
    counter = ResidentCounter(store)
    cfg = TrainConfig(k=4, num_latents=64, batch_size=128, lr=1e-2, epochs=2, log_every=4, save_every=8,
                      dead_tokens_threshold=1024, max_resident_shards=budget)
    train(store, tmp_path / "ckpt", "hp", cfg, progress=False)
    assert counter.peak == budget  # the bound is reached and never passed
    assert counter.at_batches and max(counter.at_batches) <= budget
    assert len(counter.reads) == 2 * SHARDS and len(set(counter.reads)) == SHARDS  # each shard once per epoch
    log = [json.loads(line) for line in (tmp_path / "ckpt" / "hp" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 * SHARDS * ROWS // 128 and log[-1]["fvu"] < 0.8 * log[0]["fvu"]
    with pytest.raises(ValueError, match="max_resident_shards: saved 2, now 3"):  # another row order: no resume
        train(store, tmp_path / "ckpt", "hp", TrainConfig(**{**cfg.__dict__, "max_resident_shards": 3}), progress=False)
    with pytest.raises(ValueError, match="max_resident_shards"):
        TrainConfig(max_resident_shards=0).validate()


def test_reader_bound_and_coverage_with_a_consumer_holding_batches(tmp_path):
    """The reader alone: a consumer that keeps its last batches pins no buffer; every row comes once."""
    store = make_store(tmp_path / "store")
    counter = ResidentCounter(store)
    held, seen = [], []
    for batch in store.iter_batches("hp", 48, buffer_shards=3, drop_last=False, seed=1):
        held = (held + [batch])[-3:]  # e.g. a prefetching consumer
        seen.append(batch["timestep"])
        assert counter.live <= 3
    assert counter.peak == 3
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(SHARDS * ROWS, dtype=torch.float32))
