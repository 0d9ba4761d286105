"""ProgressiveKLTrainer: the drop-in trainer, skip policies, epochs, monitor and checkpoints."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch

import bgflow_gate

from bgflow_gate import (
    ConstantSchedule,
    LinearSchedule,
    ProgressiveKLTrainer,
    ScheduledEnergyGate,
    ThreeStageSchedule,
    TrainingHealthWarning,
    bg,
)
from bgflow_gate.training import HISTORY_KEYS
from bgflow_gate.targets import generator_target
from bgflow_gate.training import clip_gradient
from bgflow_gate.systems.toy import ElementwiseAffineFlow, steep_well_generator

FAST_THREE_STAGE = ThreeStageSchedule(1e10, 1e5, hold_epochs=5, warmup_epochs=30)


def make(schedule=FAST_THREE_STAGE, lr=0.05, seed=0, **kwargs):
    """A steep-well generator (untrained energies ~1e8 kJ/mol), its data and a trainer."""
    torch.manual_seed(seed)
    gen = steep_well_generator()
    data = generator_target(gen).sample(2560, generator=torch.Generator().manual_seed(1))
    kwargs.setdefault("target_unit", "kJ/mol")
    trainer = ProgressiveKLTrainer(gen, torch.optim.Adam(gen.parameters(), lr=lr), schedule=schedule, **kwargs)
    return gen, data, trainer


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingHealthWarning)
        return fn(*args, **kwargs)


# -- the seed's story ---------------------------------------------------------------------


def test_legacy_linear_schedule_with_batch_policy_stalls_and_the_monitor_says_so():
    gen, _, trainer = make(LinearSchedule(), train_likelihood=False, iters_per_epoch=5, skip_policy="batch")
    with pytest.warns(TrainingHealthWarning, match="epoch 19: every KL batch was skipped for 20 epochs"):
        history = trainer.train(n_epochs=25, batchsize=256)
    assert [r["skip_rate"] for r in history] == [1.0] * 25
    assert all(math.isnan(r["kll"]) for r in history)  # never reported as a loss of 0
    assert gen.flow.shift.abs().max().item() == 0.0  # nothing was learned
    assert any("every KL batch was skipped" in a for a in history[19]["alerts"])
    assert math.isnan(trainer.reporter.recent(1)[0, 0])


def test_three_stage_mixed_training_skips_under_ten_percent_after_the_warm_up():
    gen, data, trainer = make()
    history = quiet(trainer.train, n_epochs=40, data=data, batchsize=256, w_energy=0.1)
    after = [r for r in history if r["epoch"] >= 30]
    assert len(after) == 10 and all(r["e_max"] == 1e5 for r in after)
    assert max(r["skip_rate"] for r in after) < 0.1
    assert history[-1]["energy_p50"] < 10.0 < 1e7 < history[0]["energy_p50"]


def test_drop_keeps_the_nll_learning_while_kl_batches_are_skipped_and_step_does_not():
    _, data, drop = make(LinearSchedule(1e7, 1e4, 10), skip_policy="drop")
    drop_history = quiet(drop.train, n_epochs=25, data=data, batchsize=256)
    assert drop_history[0]["skip_rate"] == 1.0 and drop_history[5]["skip_rate"] == 1.0
    assert drop_history[5]["nll"] < drop_history[0]["nll"] - 2  # NLL learns while KL is skipped
    assert drop_history[-1]["skip_rate"] == 0.0  # ... until the KL term applies again

    gen, data, step = make(LinearSchedule(1e7, 1e4, 10), skip_policy="step")
    step_history = quiet(step.train, n_epochs=25, data=data, batchsize=256)
    assert all(r["steps_skipped"] == r["batches"] == 10 for r in step_history)
    assert all(math.isnan(r["nll"]) for r in step_history)  # no step was applied
    assert gen.flow.log_scale.abs().max().item() == 0.0


def test_on_stall_relax_raises_e_max_until_training_resumes():
    _, _, trainer = make(
        LinearSchedule(), train_likelihood=False, iters_per_epoch=5, skip_policy="drop",
        on_stall="relax", monitor={"stall_epochs": 3}, relax_factor=100.0,
    )
    history = quiet(trainer.train, n_epochs=20, batchsize=256)
    actions = [a for r in history for a in r["actions"]]
    assert actions and actions[0].startswith("epoch 2: relaxed E_max by x100")
    assert trainer.gate.relaxation >= 100.0
    assert history[-1]["skip_rate"] < 0.5  # recovered without a restart


def test_adaptive_quantile_keeps_a_too_short_warm_up_from_stalling():
    short = ThreeStageSchedule(1e10, 1e5, hold_epochs=0, warmup_epochs=2)

    def run(**kwargs):
        _, data, trainer = make(short, lr=0.02, **kwargs)
        return quiet(trainer.train, n_epochs=40, data=data, batchsize=256, w_energy=0.05)

    plain = run()
    adaptive = run(adaptive_quantile=0.9)
    assert sum(r["skip_rate"] == 1.0 for r in plain) >= 10  # the cliff at the end of the warm-up
    assert max(r["skip_rate"] for r in adaptive[1:]) < 0.5
    assert adaptive[5]["e_max"] > adaptive[5]["scheduled_e_max"] == 1e5  # held back by the model
    assert adaptive[-1]["e_max"] == 1e5  # ... until the model allowed E_final


# -- drop-in behaviour ----------------------------------------------------------------------


def test_the_trainer_gates_the_generators_target_without_changing_the_generator():
    torch.manual_seed(0)
    gen = steep_well_generator()
    target = generator_target(gen)
    trainer = ProgressiveKLTrainer(gen, target_unit="kJ/mol")
    assert generator_target(gen) is target  # the generator still has its own target
    assert trainer.gate.target is target and trainer.gate.schedule == ThreeStageSchedule()
    assert trainer.gate.target_unit == "kJ/mol"
    gated = bg.BoltzmannGenerator(gen.prior, gen.flow, trainer.gate)
    assert ProgressiveKLTrainer(gated).gate is trainer.gate  # a generator whose target is a gate keeps it


def test_for_generator_builds_a_gate_around_the_target_and_leaves_the_generator_alone():
    gen = steep_well_generator()
    target = generator_target(gen)
    gate = ScheduledEnergyGate.for_generator(gen, target_unit="kJ/mol", schedule=1e6)
    assert gate.target is target and generator_target(gen) is target and gate.e_max == 1e6


def test_a_target_of_unknown_unit_is_an_error_that_says_what_to_pass():
    gen = bg.BoltzmannGenerator(bg.NormalDistribution(2), ElementwiseAffineFlow(2), bg.DoubleWellEnergy(2))
    with pytest.raises(ValueError, match=r"cannot be determined; pass target_unit='kJ/mol', or target_unit='kT' with temperature"):
        ProgressiveKLTrainer(gen)


def test_a_given_gate_must_wrap_the_generators_target():
    gen = steep_well_generator()
    inner = generator_target(gen)
    gate = ScheduledEnergyGate(inner, schedule=1e6, target_unit="kJ/mol")
    assert ProgressiveKLTrainer(gen, gate=gate).gate is gate and generator_target(gen) is inner
    gated = bg.BoltzmannGenerator(gen.prior, gen.flow, gate)
    with pytest.raises(ValueError, match="already a gate"):
        ProgressiveKLTrainer(gated, gate=ScheduledEnergyGate(inner, target_unit="kJ/mol"))
    with pytest.raises(ValueError, match="must wrap the generator's target"):
        ProgressiveKLTrainer(steep_well_generator(), gate=gate)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"skip_policy": "ignore"}, "skip_policy must be one of drop, batch, step, clamp"),
        ({"on_stall": "panic"}, "on_stall must be 'warn' or 'relax'"),
        ({"iters_per_epoch": 0}, "iters_per_epoch must be a positive whole number"),
        ({"checkpoint_every": 2}, "checkpoint_every needs checkpoint_path"),
        ({"min_keep_fraction": -0.1}, "min_keep_fraction must be a non-negative"),
        ({"min_keep_fraction": 5}, r"min_keep_fraction must lie in \[0, 1\]"),
        ({"monitor": {"stall_epochs": 0}}, "stall_epochs must be a positive whole number"),
    ],
)
def test_bad_trainer_arguments_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_an_epoch_is_one_pass_over_the_data_unless_given_and_required_without_data():
    _, data, trainer = make()
    quiet(trainer.train, 3, data=data, batchsize=256)
    assert trainer.iters_per_epoch == 10 and trainer.epoch == pytest.approx(0.3)
    _, _, kl_only = make(train_likelihood=False)
    with pytest.raises(ValueError, match="iters_per_epoch is needed"):
        kl_only.train(n_epochs=1, batchsize=64)
    with pytest.raises(ValueError, match="exactly one of n_iter and n_epochs"):
        kl_only.train(5, n_epochs=1)


def test_the_epoch_survives_across_train_calls_and_moves_the_gate():
    _, data, trainer = make(iters_per_epoch=4)
    quiet(trainer.train, 6, data=data, batchsize=64)
    quiet(trainer.train, n_epochs=1.5, data=data, batchsize=64)
    assert trainer.iteration == 12 and trainer.epoch == 3.0
    assert [r["epoch"] for r in trainer.history] == [0, 1, 2]
    assert trainer.gate.epoch == pytest.approx(11 / 4)


def test_clamp_policy_keeps_gated_samples_in_the_kl_term():
    _, _, trainer = make(ConstantSchedule(1e3), train_likelihood=False, iters_per_epoch=2, skip_policy="clamp")
    history = quiet(trainer.train, n_epochs=2, batchsize=64)
    assert all(r["skip_rate"] == 0.0 and r["samples_gated"] == r["samples"] == 128 for r in history)
    assert all(math.isfinite(r["kll"]) for r in history)


def test_steps_with_nan_or_inf_gradients_are_not_applied_and_are_counted():
    class NaNSampler:  # a sampler of the user's whose batches turn NaN (tensor data are checked up front)
        def sample(self, n):
            return torch.full((n, 2), math.nan)

    gen, data, trainer = make(iters_per_epoch=2, train_energy=False)
    quiet(trainer.train, n_epochs=1, data=NaNSampler(), batchsize=64)
    assert trainer.history[-1]["nonfinite_steps"] == 2 and gen.flow.shift.abs().max().item() == 0.0

    gen, data, trainer = make(iters_per_epoch=2, train_energy=False, custom_loss=lambda: None)
    trainer.custom_loss = lambda: (gen.flow.shift * math.inf).sum()  # an inf gradient, not NaN
    quiet(trainer.train, n_epochs=1, data=data, batchsize=64, w_custom=1.0)
    assert trainer.history[-1]["nonfinite_steps"] == 2 and gen.flow.shift.abs().max().item() == 0.0


def test_training_data_with_nan_rows_is_an_error_naming_the_rows():
    gen, data, trainer = make(iters_per_epoch=2, train_energy=False)
    bad = data.clone()
    bad[[3, 7]] = math.nan
    with pytest.raises(ValueError, match=r"data has 2 row\(s\) with NaN or inf \(rows 3, 7\) of 2560"):
        trainer.train(n_epochs=1, data=bad, batchsize=64)
    assert trainer.iteration == 0


def test_a_batch_size_of_zero_is_an_error():
    gen, data, trainer = make(iters_per_epoch=2)
    with pytest.raises(ValueError, match="batchsize must be a whole number >= 1, got 0"):
        trainer.train(n_epochs=1, data=data, batchsize=0)


def test_per_iteration_schedulers_step_after_the_optimiser_so_the_first_rate_is_used():
    gen, data, trainer = make(iters_per_epoch=4, train_energy=False, lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(trainer.optim, step_size=1, gamma=0.5)
    seen = []
    trainer.train(4, data=data, batchsize=64, schedulers=[(2, scheduler)],
                  on_epoch_end=lambda t, record: seen.append(record["lr"]))
    assert seen == [0.025]  # stepped after iterations 1 and 3 (0.1 -> 0.05 -> 0.025)
    assert trainer.reporter.recent(4).shape == (1, 4)


def test_clip_forces_clamps_each_force_component_on_the_samples():
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    (clip_gradient(x, 0.5) * torch.tensor([[100.0, -0.2]], dtype=torch.float64)).sum().backward()
    assert x.grad.tolist() == [[0.5, -0.2]]
    gen, _, trainer = make(ConstantSchedule(1e12), train_likelihood=False, iters_per_epoch=1, lr=0.0)
    trainer.train(1, batchsize=64, clip_forces=1e-3)
    clipped = gen.flow.shift.grad.abs().max().item()
    assert 0 < clipped <= 1e-3 + 1e-15  # the mean over samples of forces clamped to 1e-3
    _, _, unclipped = make(ConstantSchedule(1e12), train_likelihood=False, iters_per_epoch=1, lr=0.0)
    unclipped.train(1, batchsize=64)
    assert unclipped.bg.flow.shift.grad.abs().max().item() > 100 * clipped


# -- history, reporting, schedulers -----------------------------------------------------------


def test_history_has_the_documented_fields_and_exports_as_csv_and_json_lines(tmp_path):
    _, data, trainer = make(iters_per_epoch=3)
    quiet(trainer.train, n_epochs=2, data=data, batchsize=32)
    record = trainer.history[0]
    assert set(HISTORY_KEYS) <= set(record)
    assert (record["batches"], record["samples"]) == (3, 96)
    trainer.write_history(tmp_path / "h.csv")
    trainer.write_history(tmp_path / "h.jsonl")
    lines = (tmp_path / "h.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,e_max,scheduled_e_max,batches") and len(lines) == 3
    rows = [json.loads(line) for line in (tmp_path / "h.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and rows[1]["batches"] == 3


def test_the_history_keys_the_readme_documents_are_exactly_the_records_fields():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    documented = re.search(r"the fields of\s+`bgflow_gate.training.EpochRecord`: `([^`]*)`", readme).group(1)
    assert {k.strip() for k in documented.split(",")} == set(HISTORY_KEYS)
    _, data, trainer = make(iters_per_epoch=2)
    quiet(trainer.train, n_epochs=1, data=data, batchsize=32)
    assert set(trainer.history[0]) == set(HISTORY_KEYS)


def test_n_print_prints_a_summary_line_per_epoch_and_the_progress_bar_gets_numbers(capsys):
    class Bar:
        def __init__(self, it):
            self.it, self.postfix = it, None

        def __iter__(self):
            return iter(self.it)

        def set_postfix(self, **kwargs):
            self.postfix = kwargs

    bars = []
    _, data, trainer = make(iters_per_epoch=2)
    quiet(trainer.train, n_epochs=2, data=data, batchsize=32, n_print=100, progress_bar=lambda it: bars.append(Bar(it)) or bars[-1])
    out = capsys.readouterr().out
    assert out.count("epoch    0  E_max 1e+10 kJ/mol  KL skipped 0/2 (0%)") == 1
    assert set(bars[0].postfix) == {"epoch", "loss", "e_max", "skip"} and bars[0].postfix["epoch"] == 1


def test_lr_warm_up_is_linear_composes_with_schedulers_and_epoch_schedulers_step_once_per_epoch():
    gen, data, trainer = make(iters_per_epoch=4, lr=0.1, lr_warmup_epochs=2)
    used = []
    trainer.optim.register_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    constant = torch.optim.lr_scheduler.LambdaLR(trainer.optim, lambda i: 1.0)  # sets lr every iteration
    quiet(trainer.train, n_epochs=2, data=data, batchsize=16, schedulers=[(1, constant)])
    assert used == pytest.approx([0.1 * k / 8 for k in range(1, 9)])  # linear, no overshoot
    assert [r["lr"] for r in trainer.history] == pytest.approx([0.05, 0.1])
    assert trainer.optim.param_groups[0]["lr"] == pytest.approx(0.1)
    sched = torch.optim.lr_scheduler.StepLR(trainer.optim, step_size=1, gamma=0.5)
    quiet(trainer.train, n_epochs=2, data=data, batchsize=16, epoch_schedulers=[sched])
    assert [r["lr"] for r in trainer.history[-2:]] == pytest.approx([0.1, 0.05])  # the rate used in the epoch
    assert trainer.optim.param_groups[0]["lr"] == pytest.approx(0.025)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(trainer.optim, patience=0, factor=0.5)
    quiet(trainer.train, n_epochs=2, data=data, batchsize=16, epoch_schedulers=[plateau])  # gets the loss


# -- checkpoints ------------------------------------------------------------------------------


def _comparable(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def test_a_stopped_and_resumed_run_has_the_same_history_as_an_uninterrupted_one(tmp_path):
    kwargs = dict(iters_per_epoch=3, checkpoint_every=2, checkpoint_path=tmp_path / "ckpt.pt", test_likelihood=True)
    fit = dict(data=None, batchsize=32, w_energy=0.5)
    _, data, full = make(**kwargs)
    quiet(full.train, n_epochs=6, **{**fit, "data": data}, testdata=data)

    _, data, first = make(**kwargs)
    quiet(first.train, n_epochs=5, **{**fit, "data": data}, testdata=data)  # "killed" after epoch 5
    gen, data, resumed = make(**kwargs, seed=123)  # a fresh process, other seed
    resumed.resume(tmp_path / "ckpt.pt")  # written at the end of epoch 4 (index 3)
    assert resumed.iteration == 12 and len(resumed.history) == 4
    quiet(resumed.train, n_epochs=2, **{**fit, "data": data}, testdata=data)
    assert _comparable(resumed.history) == _comparable(full.history)
    assert torch.equal(gen.flow.shift, full.bg.flow.shift)
    assert resumed.reporter.losses()[2][2].tolist() == full.reporter.losses()[2][2].tolist()  # test NLL


def test_a_checkpoint_write_that_fails_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    _, data, trainer = make(iters_per_epoch=2)
    quiet(trainer.train, n_epochs=1, data=data, batchsize=32)
    trainer.save_checkpoint(path)
    before = path.read_bytes()

    def killed(obj, fh):
        fh.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        trainer.resume(tmp_path / "missing.pt")


def test_test_nll_and_custom_losses_are_reported_like_bgflow():
    gen, data, trainer = make(iters_per_epoch=2, test_likelihood=True, custom_loss=lambda: gen.flow.shift.pow(2).sum())
    quiet(trainer.train, 2, data=data, testdata=data, batchsize=32, w_custom=0.5)
    labels, _, values = trainer.reporter.losses()
    # the trainer labels the custom loss with either host (bgflow's own trainer has no label for it)
    assert tuple(labels) == ("KLL", "NLL", "NLL(Test)", "Custom")
    assert all(len(v) == 2 and all(math.isfinite(x) for x in v) for v in values)


def test_tensorboard_logging_is_optional(tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.warns(RuntimeWarning, match="log_dir needs the tensorboard package"):
            make(log_dir=tmp_path)
        return
    _, data, trainer = make(iters_per_epoch=2, log_dir=tmp_path)
    quiet(trainer.train, n_epochs=1, data=data, batchsize=32)
    trainer.close()
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())


def test_a_few_nan_samples_from_the_flow_skip_the_kl_term_but_not_the_nll_step():
    gen, data, trainer = make(iters_per_epoch=4, skip_policy="clamp")
    forward = gen.flow._forward

    def sometimes_nan(z, **kwargs):
        x, dlogp = forward(z, **kwargs)
        return torch.cat([x[:-2], x[-2:] * math.nan]), dlogp  # backward: 0 * NaN = NaN

    gen.flow._forward = sometimes_nan  # the KL batch always holds two NaN samples
    history = quiet(trainer.train, n_epochs=2, data=data, batchsize=64)
    assert all(r["kl_nonfinite"] == r["batches_skipped"] == 4 for r in history)
    assert all(r["steps_skipped"] == 0 and math.isfinite(r["nll"]) for r in history)
    assert history[1]["nll"] < history[0]["nll"]  # the NLL kept learning


def test_a_checkpoint_in_the_middle_of_an_epoch_resumes_its_counters(tmp_path):
    _, data, full = make(iters_per_epoch=10)
    quiet(full.train, 10, data=data, batchsize=32)
    _, data, half = make(iters_per_epoch=10)
    quiet(half.train, 5, data=data, batchsize=32)
    half.save_checkpoint(tmp_path / "mid.pt")
    _, data, resumed = make(iters_per_epoch=10, seed=7)
    resumed.resume(tmp_path / "mid.pt")
    quiet(resumed.train, 5, data=data, batchsize=32)
    assert _comparable(resumed.history) == _comparable(full.history)
    assert resumed.history[0]["batches"] == 10


# -- what a sample contributes to the KL term, through the trainer ---------------------------


def test_when_every_sample_is_below_e_cut_the_kl_loss_is_bgflows():
    gen, _, trainer = make(ConstantSchedule(1e12), train_likelihood=False, iters_per_epoch=1, e_cut=1e11, lr=0.0)
    torch.manual_seed(5)
    expected = gen.kldiv(256).mean().item()
    torch.manual_seed(5)
    trainer.train(1, batchsize=256)
    record = trainer.history[0]
    assert record["samples_above_cut"] == 0 and record["samples_gated"] == 0
    assert record["kll"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("above_cut", ["energy", "energy+entropy", "none"])
def test_the_history_counts_the_samples_above_e_cut_and_the_gradient_stays_finite(above_cut):
    # untrained steep-well samples lie around 1e8 kJ/mol: above E_cut 500, below E_max 1e12
    gen, _, trainer = make(ConstantSchedule(1e12), train_likelihood=False, iters_per_epoch=2, above_cut=above_cut)
    quiet(trainer.train, n_epochs=1, batchsize=64)
    record = trainer.history[0]
    assert record["samples_above_cut"] == 128 and record["nonfinite_steps"] == 0
    assert record["batches_skipped"] == (2 if above_cut == "none" else 0)  # "none" leaves nothing to average
    assert torch.isfinite(gen.flow.shift).all()


def test_above_cut_energy_moves_an_untrained_flow_inward_where_energy_plus_entropy_pushes_it_out():
    log_scale, p50 = {}, {}
    for option in ("energy", "energy+entropy"):
        gen, _, trainer = make(ConstantSchedule(1e12), train_likelihood=False, iters_per_epoch=10, above_cut=option)
        quiet(trainer.train, n_epochs=3, batchsize=128)
        log_scale[option], p50[option] = gen.flow.log_scale.mean().item(), trainer.history[-1]["energy_p50"]
    assert log_scale["energy"] < 0 < log_scale["energy+entropy"]  # narrower vs wider than the prior
    assert p50["energy"] < p50["energy+entropy"]


def test_a_checkpoint_keeps_the_above_cut_option_and_an_old_format_is_a_clear_error(tmp_path):
    gen, data, trainer = make(iters_per_epoch=2, above_cut="none")
    quiet(trainer.train, n_epochs=1, data=data, batchsize=32)
    path = trainer.save_checkpoint(tmp_path / "c.pt")
    _, _, again = make(iters_per_epoch=2)
    again.resume(path)
    assert again.gate.above_cut == "none"
    state = torch.load(path, weights_only=False)
    del state["format"]
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"written by bgflow-gate 0.1 \(checkpoint format 1"):
        again.resume(tmp_path / "old.pt")
