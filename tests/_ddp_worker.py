"""Two-process CPU (gloo) training run for tests/test_train.py: ``python tests/_ddp_worker.py OUT``.

Each rank trains on the same in-memory tokens (it reads only its own slice of every batch), writes
into its own ``OUT/rank<r>/`` (only rank 0 may write anything) and dumps its final weights to
``OUT/weights<r>.safetensors`` so the test can check both ranks agree; then the same again from an
ActivationStore (``OUT/store_rank<r>/``, ``OUT/store_weights<r>.safetensors``).
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def make_data():
    """2048 tokens of width 16 built from 32 sparse atoms (the same on every rank)."""
    g = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(32, 16, generator=g), dim=1)
    codes = torch.rand(2048, 32, generator=g) * (torch.rand(2048, 32, generator=g) < 0.1)
    return codes @ atoms + 0.01 * torch.randn(2048, 16, generator=g)


def run(rank: int, world: int, out: str) -> None:
    """One rank: join the gloo group, train, dump the final weights."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out, 'rendezvous')}", rank=rank, world_size=world)
    try:
        from safetensors.torch import save_file

        from saeuron.trainer import TrainConfig, train

        x = make_data()
        cfg = TrainConfig(k=4, num_latents=64, batch_size=128, lr=1e-2, epochs=2, log_every=4, save_every=16,
                          dead_tokens_threshold=1024)
        sae = train(x, os.path.join(out, f"rank{rank}"), hookpoint="hp", cfg=cfg, progress=False)
        save_file({k: v.contiguous() for k, v in sae.state_for_disk().items()}, os.path.join(out, f"weights{rank}.safetensors"))
        # the same through an ActivationStore: shards are dealt round-robin, so the ranks hold unequal shares
        from saeuron.store import ActivationStore

        store = ActivationStore(os.path.join(out, "store"))
        sae = train(store, os.path.join(out, f"store_rank{rank}"), hookpoint="hp", cfg=cfg, progress=False)
        save_file({k: v.contiguous() for k, v in sae.state_for_disk().items()},
                  os.path.join(out, f"store_weights{rank}.safetensors"))
        dist.barrier()  # neither rank tears gloo down while the other still talks (an abort at exit otherwise, rarely)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    from saeuron.store import ActivationStore

    data = make_data()[:1104]  # 23 shards of 48 rows: 12 for rank 0, 11 for rank 1
    st = ActivationStore.create(os.path.join(out_dir, "store"), {"hp": 16}, ["p"])
    for b in range(23):
        st.write_batch(b, {"hp": {"x": data[48 * b:48 * (b + 1)], "timestep": torch.zeros(48),
                                  "prompt_id": torch.zeros(48, dtype=torch.long)}})
    mp.spawn(run, args=(2, out_dir), nprocs=2, join=True)
