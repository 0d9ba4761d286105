"""Throughput of data-parallel ProgressiveKLTrainer with 1, 2, ... processes.

Every process trains the alanine dipeptide spline generator of an experiment (default
``smoke``: its data, model, gate and OpenMM energy settings, built as ``bgflow-gate train``
builds them; ``smoke`` and ``aa_300_450_cpu`` have one OpenMM context per process), mixed
NLL + KL, ``--batch`` samples per process and iteration, the flow wrapped in
``DistributedDataParallel`` (gloo on the CPU, NCCL with ``--device cuda``, one GPU per
process). After ``--warmup`` iterations the script times ``--iters`` iterations and prints,
per number of processes: seconds per iteration, generated samples per second over all
processes, the speed-up over one process and the parallel efficiency.

The CPU cores are shared: each of N processes gets ``cores // N`` torch threads (at least 1),
so one process uses every core as well.

Usage::

    python benchmarks/bench_distributed.py                   # 1 and 2 processes
    python benchmarks/bench_distributed.py --procs 1 2 4 8 --batch 256
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
import uuid
import warnings
from pathlib import Path


def worker(rank, world, store, args, queue):
    import torch
    import torch.distributed as dist

    from bgflow_gate import ProgressiveKLTrainer, TrainingHealthWarning
    from bgflow_gate.config import load_experiments, run_settings
    from bgflow_gate.distributed import Ranks
    from bgflow_gate.pipeline import RunContext

    warnings.simplefilter("ignore", TrainingHealthWarning)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        settings = run_settings(load_experiments(args.config), args.experiment, device=args.device)
        # the pipeline's data, energy and generator (its flow wrapped in DDP)
        ctx = RunContext(settings, args.data_dir, lambda line: None, False, Ranks.default())
        t, g = settings["training"], settings["gate"]
        torch.manual_seed(0)
        gen, _ = ctx.generator()
        data = ctx.train
        trainer = ProgressiveKLTrainer(
            gen, torch.optim.Adam(gen.parameters(), lr=1e-4), schedule=g["schedule"], e_cut=g["e_cut"],
            iters_per_epoch=20, skip_policy=t["skip_policy"],
        )
        kwargs = dict(data=data, batchsize=args.batch, w_likelihood=0.9, w_energy=0.1)
        trainer.train(args.warmup, **kwargs)
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.train(args.iters, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        seconds = time.perf_counter() - start
        ctx.close()
        if rank == 0:
            queue.put((seconds, torch.get_num_threads()))
    finally:
        dist.destroy_process_group()


def measure(world: int, args) -> tuple[float, int]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    store = Path(tempfile.gettempdir()) / f"bench-distributed-{uuid.uuid4().hex}"
    procs = [ctx.Process(target=worker, args=(r, world, store, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    result = queue.get(timeout=3600)
    for p in procs:
        p.join()
    store.unlink(missing_ok=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="numbers of processes to time")
    parser.add_argument("--experiment", default="smoke")
    parser.add_argument("--config", help="experiments file (default: the one shipped with the package)")
    parser.add_argument("--data-dir", help="data cache (default: the per-user cache, as 'bgflow-gate data')")
    parser.add_argument("--batch", type=int, default=128, help="samples per process and iteration")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()

    from bgflow_gate.config import DEFAULT_CONFIG, load_experiments, run_settings
    from bgflow_gate.systems.data import generate_dataset

    args.config = args.config or str(DEFAULT_CONFIG)

    # the data once, before the processes start (they read the cache)
    generate_dataset(run_settings(load_experiments(args.config), args.experiment, device="cpu")["data"],
                     args.data_dir, progress=False)
    print(f"experiment {args.experiment}, batch {args.batch} per process, {args.iters} timed iterations, "
          f"{os.cpu_count()} CPU cores, backend {'nccl' if args.device == 'cuda' else 'gloo'}")
    print(f"{'processes':>9} {'threads':>7} {'s/iteration':>12} {'samples/s':>10} {'speed-up':>9} {'efficiency':>10}")
    reference = None  # (processes, samples/s) of the first row
    for n in args.procs:
        seconds, threads = measure(n, args)
        rate = n * args.batch * args.iters / seconds
        reference = reference or (n, rate)
        speedup = rate / reference[1]
        print(f"{n:>9} {threads:>7} {seconds / args.iters:>12.4f} {rate:>10.1f} {speedup:>9.2f} "
              f"{speedup * reference[0] / n:>10.0%}", flush=True)

if __name__ == "__main__":
    main()
