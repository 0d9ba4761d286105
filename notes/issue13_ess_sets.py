"""The ESS of a run's models on several independent sets of samples (issue 13: heavy tails).

One set's bootstrap interval cannot show a weight larger than any in the set; independent sets
can. For each model of the run: the Kish ESS of ``--sets`` sets of ``--samples`` samples each
(latent seeds 100, 101, ...) and the largest single weight's share of each set.

    python notes/issue13_ess_sets.py RUN_DIR [--experiment aa_vacuum_is] [--sets 5] [--samples 100000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bgflow_gate.config import DEFAULT_CONFIG, load_experiments, run_settings
from bgflow_gate.distributed import Ranks
from bgflow_gate.pipeline import RunContext, RunDirectory

sys.path.insert(0, str(Path(__file__).parent))
from issue13_float64 import ess_percent, log_weights  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--experiment", default="aa_vacuum_is")
    p.add_argument("--sets", type=int, default=5)
    p.add_argument("--samples", type=int, default=100_000)
    a = p.parse_args()
    torch.set_num_threads(1)
    settings = run_settings(load_experiments(DEFAULT_CONFIG), a.experiment, device="cpu")
    ctx = RunContext(settings, None, lambda line: None, False, Ranks.default())
    run = RunDirectory(a.run_dir)
    for stage in ctx.stages:
        gen, _ = ctx.generator(run.model(stage), parallel=False)
        ess, share = [], []
        for s in range(a.sets):
            z = torch.randn(a.samples, gen.prior.dim, generator=torch.Generator().manual_seed(100 + s))
            lw = log_weights(gen, ctx.target, z)
            lw = lw[torch.isfinite(lw)]
            w = torch.exp(lw - lw.max())
            ess.append(ess_percent(lw))
            share.append(float(w.max() / w.sum()))
        print(f"{stage:8s} ESS % " + ", ".join(f"{v:.1f}" for v in ess)
              + " | largest weight's share " + ", ".join(f"{v:.4f}" for v in share), flush=True)


if __name__ == "__main__":
    main()
