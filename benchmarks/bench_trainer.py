"""What ProgressiveKLTrainer costs per iteration against the plain KLTrainer of the host.

Both train the same generator (a RealNVP of ``--blocks`` affine coupling blocks on
``--dim`` dimensions, hidden width ``--hidden``) from the same seed on the same target
and data, mixed NLL + KL with batch size ``--batch``. The plain trainer sees the raw
target; the progressive one wraps it in its gate (statistics, skip policy, history,
monitor included). The script times ``--iters`` iterations of each, alternating, takes the
best of ``--repeats`` rounds, and prints both and the overhead.

Usage::

    python benchmarks/bench_trainer.py
    python benchmarks/bench_trainer.py --dim 66 --blocks 8 --batch 512 --device cuda
    python benchmarks/bench_trainer.py --device cuda --profile 10   # also where the time goes
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch

from bgflow_gate import ProgressiveKLTrainer, TrainingHealthWarning, bg
from bgflow_gate.host import KLTrainer as HostKLTrainer
from bgflow_gate.systems.alanine import realnvp_blocks
from bgflow_gate.systems.toy import SteepWellEnergy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=66)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="then profile N iterations of each trainer and print its costliest operations")
    args = parser.parse_args()
    device = torch.device(args.device)
    warnings.simplefilter("ignore", TrainingHealthWarning)

    torch.manual_seed(0)
    target = SteepWellEnergy(args.dim, mode=0.0, width=0.3).to(device)
    prior = bg.NormalDistribution(args.dim, mean=torch.zeros(args.dim, device=device))
    flow = bg.SequentialFlow(realnvp_blocks(args.dim, args.blocks, args.hidden)).to(device)
    data = (0.3 * torch.randn(20 * args.batch, args.dim)).to(device)

    def build(cls, **kwargs):
        generator = bg.BoltzmannGenerator(prior, copy.deepcopy(flow), target)
        return cls(generator, torch.optim.Adam(generator.parameters(), lr=1e-4), **kwargs)

    trainers = {
        "KLTrainer (host)": build(HostKLTrainer),
        "ProgressiveKLTrainer": build(ProgressiveKLTrainer, target_unit="kJ/mol", iters_per_epoch=10),
    }
    best = {name: float("inf") for name in trainers}
    for name, trainer in trainers.items():  # warm-up
        trainer.train(5, data=data, batchsize=args.batch, w_energy=0.1)
    for _ in range(args.repeats):
        for name, trainer in trainers.items():
            torch.manual_seed(1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            trainer.train(args.iters, data=data, batchsize=args.batch, w_energy=0.1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best[name] = min(best[name], (time.perf_counter() - t0) / args.iters)

    n_params = sum(p.numel() for p in flow.parameters())
    print(
        f"torch {torch.__version__}, device {device}, CPU threads {torch.get_num_threads()}; "
        f"RealNVP {args.blocks} blocks x {args.hidden} hidden on {args.dim} dims ({n_params} parameters), "
        f"batch {args.batch}, mixed NLL + KL; best of {args.repeats} x {args.iters} iterations"
    )
    plain, progressive = best["KLTrainer (host)"], best["ProgressiveKLTrainer"]
    for name, seconds in best.items():
        print(f"  {name:<22} {1e3 * seconds:8.2f} ms / iteration")
    print(f"  overhead               {100 * (progressive / plain - 1):+8.1f} %  (ratio {progressive / plain:.3f})")
    if args.profile:
        for name, trainer in trainers.items():
            profile(name, lambda: trainer.train(args.profile, data=data, batchsize=args.batch, w_energy=0.1), device)


def profile(name: str, run, device: torch.device, rows: int = 12) -> None:
    """Print the operations of ``run()`` that cost the most (device time on a GPU, else CPU time)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key == "cudaLaunchKernel") if device.type == "cuda" else None
    print(f"\n{name}: the {rows} costliest operations"
          + ("" if launches is None else f" ({launches} kernel launches)"))
    print(events.table(sort_by=key, row_limit=rows))


if __name__ == "__main__":
    main()
