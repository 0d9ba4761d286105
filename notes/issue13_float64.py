"""Do float64 log weights change the ESS of a float32 model? (issue 13's lever "float64 log-weights")

Draws latent samples once, maps them through a trained model's flow in float32 and in float64,
evaluates the target on float64 coordinates and compares the log weights and the Kish ESS.

    python notes/issue13_float64.py RUN_DIR [--experiment aa_vacuum_is] [--stage mixed] [--samples 100000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bgflow_gate.config import DEFAULT_CONFIG, load_experiments, run_settings
from bgflow_gate.distributed import Ranks
from bgflow_gate.pipeline import RunContext, RunDirectory


def log_weights(gen, target, z: torch.Tensor, chunk: int = 5000) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(z), chunk):
            zz = z[i:i + chunk].to(next(gen.flow.parameters()).dtype)
            *x, dlogp = gen.flow(zz)
            u = target.energy(x[0].double()).view(-1)
            out.append(-u + gen.prior.energy(zz).view(-1).double() + dlogp.view(-1).double())
    return torch.cat(out)


def ess_percent(lw: torch.Tensor) -> float:
    lw = lw[torch.isfinite(lw)]
    w = torch.exp(lw - lw.max())
    return 100 * float(w.sum() ** 2 / (w ** 2).sum()) / len(lw)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--experiment", default="aa_vacuum_is")
    p.add_argument("--stage", default="mixed")
    p.add_argument("--samples", type=int, default=100_000)
    a = p.parse_args()
    torch.set_num_threads(1)
    settings = run_settings(load_experiments(DEFAULT_CONFIG), a.experiment, device="cpu")
    ctx = RunContext(settings, None, lambda line: None, False, Ranks.default())
    gen, _ = ctx.generator(RunDirectory(a.run_dir).model(a.stage), parallel=False)
    z = torch.randn(a.samples, gen.prior.dim, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    lw32 = log_weights(gen, ctx.target, z)
    gen64, _ = ctx.generator(RunDirectory(a.run_dir).model(a.stage), parallel=False)
    gen64.flow.double(), gen64.prior.double()
    lw64 = log_weights(gen64, ctx.target, z)
    both = torch.isfinite(lw32) & torch.isfinite(lw64)
    diff = (lw64 - lw32)[both].abs()
    print(f"{Path(a.run_dir).name} {a.stage}: {a.samples} samples; ESS float32 {ess_percent(lw32):.2f} %, "
          f"float64 {ess_percent(lw64):.2f} %; |log w64 - log w32| median {diff.median():.2e}, "
          f"99.9th percentile {diff.quantile(0.999):.2e}, largest {diff.max():.2e} nats")


if __name__ == "__main__":
    main()
