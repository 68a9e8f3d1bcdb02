"""Where does a 2:4 (semi-structured sparse) engine at TP=2 stop? Diagnostic for the TP=2 profiling
hang of Llama-2-7B 2:4 on two H200s: two NCCL ranks each load a 2-layer Llama-2-7B-shaped model
(random weights) as 2:4 with and without CUDA graphs, print every phase with a timestamp, and dump
their stacks and exit if a phase takes longer than LIMIT_S. Usage: python bench/probes/probe_tp_sparse.py"""

import faulthandler
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _importable import ensure_importable  # noqa: E402

ensure_importable()
import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

LIMIT_S = 90
MODEL = "/dev/shm/l7-2layers"


def say(rank, t0, what):
    print(f"[{time.perf_counter() - t0:7.2f}s] rank {rank}: {what}", flush=True)


def rank_main(rank: int, size: int) -> None:
    import torch.distributed as dist

    import iserve.gpu_agent.engine  # noqa: F401
    from iserve.gpu_agent.engine import Engine

    t0 = time.perf_counter()
    torch.cuda.set_device(rank)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("nccl", rank=rank, world_size=size)
    for graphs in (False, True):
        faulthandler.dump_traceback_later(LIMIT_S, exit=True)
        say(rank, t0, f"load 2:4 cuda_graphs={graphs}")
        engine = Engine.load(
            MODEL, [(f"cuda:{rank}", 0, 2)], 2048, pruning="2:4", tp_rank=rank, tp_size=size, cuda_graphs=graphs
        )
        say(
            rank,
            t0,
            f"loaded; fused={[s.fused for s in engine.stages]} fused_error={engine.fused_error!r} "
            f"graphs={getattr(engine, 'graphs_captured', '?')}",
        )
        if rank == 0:
            for p in (128, 1024):
                r = engine.generate(list(range(3, 3 + p)), max_tokens=8, ignore_eos=True)
                say(
                    rank,
                    t0,
                    f"generated after {p}: ttft {r.ttft_ms:.2f} ms, steps {[round(s, 3) for s in r.step_ms[:3]]}",
                )
            engine.close()
        else:
            say(rank, t0, f"followed {engine.follow()} generations")
            engine.close()
        engine.release_groups()
        faulthandler.cancel_dump_traceback_later()
    dist.destroy_process_group()
    say(rank, t0, "done")


if __name__ == "__main__":
    import iserve.gpu_agent.engine  # noqa: F401
    from iserve.modelmaker import make_checkpoint

    if not Path(MODEL, "config.json").exists():
        make_checkpoint(MODEL, "llama-2-7b", num_layers=2, dtype="float16", device="cuda")
    mp.spawn(rank_main, args=(2,), nprocs=2, join=True)
