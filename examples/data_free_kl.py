"""Data-free reverse KL on alanine dipeptide: the physical flow trained through the gate.

The generator of :mod:`bgflow_gate.systems.physical` (no MD data) is trained by reverse KL
alone at 300 K through a :class:`~bgflow_gate.ScheduledEnergyGate` (E_cut = 500 kJ/mol,
the three-stage E_max schedule stretched over ``--epochs`` of the run). The loss loop is
written out here (Adam, cosine LR, gradient-norm clip); each sample's term comes from the
gate's ``kl_terms``, so what a sample with E_cut < u <= E_max contributes is the gate's
``above_cut`` option (``--above-cut``):

* ``energy+entropy``: its soft-cut energy and its -log|det J| term (bgflow's KL);
* ``energy``: its soft-cut energy only;
* ``none``: nothing, like a gated sample.

``--drop-top K`` also leaves the K highest raw energies of every batch out of the loss
(temperature-annealed Boltzmann generators). ``--spread-scale`` widens the untrained flow
(a harder start). MD frames (all frames of the ``smoke`` experiment's data) are used only to
evaluate: phi/psi histogram KL, basin populations; the importance weights give Kish's ESS.
The results (before/after metrics, the progress log) go to ``--json``.

Run::

    python examples/data_free_kl.py [--iterations 3000] [--batch 256] [--lr 5e-4]
        [--above-cut energy] [--json data_free_kl.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from bgflow_gate import ScheduledEnergyGate, ThreeStageSchedule
from bgflow_gate.gate import ABOVE_CUT
from bgflow_gate.config import DEFAULT_CONFIG, data_settings, load_experiments
from bgflow_gate.systems.alanine import alanine_dipeptide, phi_psi
from bgflow_gate.systems.analysis import md_metrics, sample_metrics
from bgflow_gate.systems.data import generate_dataset
from bgflow_gate.systems.physical import ALL_ROTORS, BACKBONE_ROTORS, Spreads, physical_generator
from bgflow_gate.units import kt_in_kjmol

TEMPERATURE = 300.0


def kl_loss(generator, gate, batch: int, drop_top: int):
    """The gated reverse-KL loss of one batch (each sample's term from the gate's
    ``kl_terms``, i.e. its ``above_cut`` option) and the numbers to log.

    Returns ``(loss or None, raw energies in kT, samples)``; ``None`` when no sample is kept.
    """
    x, dlogp = generator.sample(batch, with_dlogp=True)
    per_sample, counted, _ = gate.kl_terms(gate.energy(x), dlogp)
    raw, gated = gate.last_raw.view(-1), gate.last_gated.view(-1)
    keep = counted & ~gated
    if drop_top > 0:
        ranked = torch.where(gated, math.inf, raw.nan_to_num(math.inf))
        keep = keep.index_fill(0, torch.topk(ranked, min(drop_top, batch)).indices, False)
    if not bool(keep.any()):
        return None, raw.detach(), x.detach()
    return per_sample[keep].mean(), raw.detach(), x.detach()


def batch_log(it: int, raw: torch.Tensor, x: torch.Tensor, loss, grad_norm: float, start: float, kt: float) -> str:
    """One progress line: energies in kJ/mol, the fraction below 500, phi basins of the batch."""
    e = raw.nan_to_num(math.inf).double() * kt
    phi = phi_psi(x.double())[0] * 180 / math.pi
    c5, c7, pos = (phi < -120).double().mean(), ((phi >= -120) & (phi < 0)).double().mean(), (phi >= 0).double().mean()
    value = float("nan") if loss is None else loss.item()
    return (f"it {it:6d}  {time.perf_counter() - start:7.0f}s  E_p50 {e.median():10.4g}  E_p90 "
            f"{e.quantile(0.9):10.4g}  <500 {(e < 500).double().mean():.3f}  loss {value:10.4g}  |g| {grad_norm:8.3g}  "
            f"phi C5 {c5:.2f} C7/aR {c7:.2f} >0 {pos:.2f}")


def train(generator, gate, args, kt: float) -> list[str]:
    """The training loop; returns the progress lines (also printed)."""
    optim = torch.optim.Adam(generator.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, args.iterations, eta_min=args.lr * args.lr_floor)
    iters_per_epoch = max(args.iterations / args.epochs, 1e-9)
    lines, start = [], time.perf_counter()
    for it in range(args.iterations):
        gate.set_epoch(it / iters_per_epoch)
        loss, raw, x = kl_loss(generator, gate, args.batch, args.drop_top)
        optim.zero_grad()
        grad_norm = math.nan
        if loss is not None and torch.isfinite(loss):
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(generator.parameters(), args.clip))
            optim.step()
        sched.step()
        if it % args.log_every == 0 or it == args.iterations - 1:
            lines.append(batch_log(it, raw, x, loss, grad_norm, start, kt))
            print(lines[-1], flush=True)
    return lines


def evaluate(generator, target, reference: torch.Tensor, n: int, kt: float) -> dict:
    """Sample metrics of ``n`` generator samples (energies, ESS, phi/psi KL, basins)."""
    xs, energies, logws = [], [], []
    with torch.no_grad():
        for chunk in range(0, n, 2000):
            x, logw = generator.sample(min(2000, n - chunk), with_log_weights=True)
            xs.append(x.double())
            energies.append(target.energy(x.double()).view(-1).numpy() * kt)
            logws.append(logw.view(-1).double().numpy())
    x, energies, logw = torch.cat(xs), np.concatenate(energies), np.concatenate(logws)
    metrics = sample_metrics(x, energies, logw, reference, kt=kt, e_cut=500.0)
    metrics["energy_quantiles_kjmol"] = [float(np.quantile(np.nan_to_num(energies, nan=np.inf), q)) for q in (0.5, 0.9, 0.99)]
    return metrics


def md_reference(data_dir: str) -> torch.Tensor:
    """All MD frames of the smoke experiment's data (evaluation only: nothing is trained on them)."""
    settings = data_settings(load_experiments(DEFAULT_CONFIG), "smoke")
    return torch.as_tensor(generate_dataset(settings, data_dir, progress=False).positions, dtype=torch.float64)


def build_generator(system, target, args):
    """The physical generator with the run's rotors, spreads and network size."""
    rotors = ALL_ROTORS if args.rotors == "all" else BACKBONE_ROTORS
    d = Spreads()
    spreads = Spreads(d.bond * args.spread_scale, d.angle * args.spread_scale, d.torsion * args.spread_scale)
    return physical_generator(system, target, rotors=rotors, spreads=spreads, hidden=args.hidden,
                              n_torsion_layers=args.layers, n_rest_layers=args.layers)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=3000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lr-floor", type=float, default=0.1, help="final LR as a fraction of --lr (cosine)")
    p.add_argument("--clip", type=float, default=100.0, help="gradient-norm clip")
    p.add_argument("--above-cut", choices=tuple(ABOVE_CUT), default="energy")
    p.add_argument("--drop-top", type=int, default=0)
    p.add_argument("--e-cut", type=float, default=500.0, help="kJ/mol")
    p.add_argument("--epochs", type=float, default=400.0, help="gate epochs the run spans")
    p.add_argument("--rotors", choices=("all", "backbone"), default="all")
    p.add_argument("--spread-scale", type=float, default=1.0,
                   help="multiply the untrained spreads (a harder, less physical start)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4, help="spline and affine couplings each")
    p.add_argument("--eval-samples", type=int, default=20000)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--json", default="data_free_kl.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    kt = kt_in_kjmol(TEMPERATURE)
    system = alanine_dipeptide("vacuum")
    target = system.energy(TEMPERATURE, platform_name="Reference")
    generator = build_generator(system, target, args)
    gate = ScheduledEnergyGate(target, ThreeStageSchedule(), e_cut=args.e_cut, above_cut=args.above_cut)
    reference = md_reference(args.data_dir)
    before = evaluate(generator, target, reference, min(args.eval_samples, 4000), kt)
    start = time.perf_counter()
    log = train(generator, gate, args, kt)
    seconds = time.perf_counter() - start
    after = evaluate(generator, target, reference, args.eval_samples, kt)
    ref_phi, ref_psi = (a.numpy() for a in phi_psi(reference))
    result = {"args": vars(args), "train_seconds": seconds, "before": before, "after": after,
              "md": md_metrics(ref_phi, ref_psi, kt), "log": log}
    print(json.dumps({k: result[k] for k in ("train_seconds", "after", "md")}, indent=1))
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
