"""Two-process CPU (gloo) collection for tests/test_collect_distributed.py: ``python tests/_collect_worker.py SPEC MODE``.

``SPEC`` is a JSON file written by the test: ``out`` (folder; the store is ``out/store``), ``words`` (the tiny
pipeline's vocabulary), ``prompts``, ``hookpoints`` and ``run`` (keyword arguments of ``collect``). Both ranks
build the same tiny pipeline and call ``collect`` on it; each dumps the batches it wrote to
``out/<MODE>_rank<r>.json``. ``MODE`` ``kill``: rank 1 SIGKILLs itself in the middle of its second batch (its
first hookpoint's shard on disk, a half-written temporary file of the second), so the run fails. Errors are
dumped to ``out/<MODE>_rank<r>_error.json``; in ``MODE`` ``refused`` they are expected and the ranks exit cleanly.
"""
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run(rank: int, world: int, spec_path: str, mode: str) -> None:
    """One rank: join the gloo group, collect, dump the batches written."""
    torch.set_num_threads(1)
    with open(spec_path) as f:
        spec = json.load(f)
    out = spec["out"]
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out, 'rendezvous_' + mode)}", rank=rank,
                            world_size=world)
    try:
        import saeuron.store as store_mod
        from saeuron.collection import collect
        from saeuron.toy import tiny_pipeline

        pipe = tiny_pipeline(words=tuple(spec["words"]))
        written = []
        real_write = store_mod.ActivationStore.write_batch

        def write_batch(self, batch_idx, rows):
            real_write(self, batch_idx, rows)
            written.append(batch_idx)

        store_mod.ActivationStore.write_batch = write_batch
        if mode == "kill" and rank == 1:
            real_save = store_mod.atomic_save_file

            def save(tensors, path, metadata=None):
                path = Path(path)
                if len(written) == 1 and path.parent.name == spec["hookpoints"][1]:
                    (path.parent / f".{path.name}.x1y2z3.tmp").write_bytes(b"half a shard")
                    os.kill(os.getpid(), signal.SIGKILL)
                return real_save(tensors, path, metadata)

            store_mod.atomic_save_file = save
        try:
            store = collect(pipe, spec["prompts"], os.path.join(out, "store"), spec["hookpoints"], **spec["run"])
        except Exception as e:
            with open(os.path.join(out, f"{mode}_rank{rank}_error.json"), "w") as f:
                json.dump({"type": type(e).__name__, "message": str(e)}, f)
            if mode == "refused":  # expected: both ranks stop, each with its own error; meet before the teardown,
                dist.barrier()     # so neither destroys the group while the other still talks (a SIGABRT seen once)
                return
            raise
        with open(os.path.join(out, f"{mode}_rank{rank}.json"), "w") as f:
            json.dump({"written": written, "done": sorted(store.done_batches())}, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    spec_file, run_mode = sys.argv[1], sys.argv[2]
    mp.spawn(run, args=(2, spec_file, run_mode), nprocs=2, join=True)
