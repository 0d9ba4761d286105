"""EarlyStopping on held-out NLL; a callback returning False stops ``train()``; the
pipeline's ``training.nll_patience`` and ``training.mixed_lr_floor``."""

from __future__ import annotations

import math

import pytest
import torch

from bgflow_gate import ProgressiveKLTrainer
from bgflow_gate.targets import generator_target
from bgflow_gate.training import EarlyStopping, RollbackOnRise
from bgflow_gate.systems.toy import steep_well_generator


class ScriptedGenerator(torch.nn.Module):
    """A generator whose held-out NLL follows a script, one value per measurement; its flow's
    one weight records which measurement it was at."""

    def __init__(self, script):
        super().__init__()
        self.flow = torch.nn.Linear(1, 1, bias=False)
        self.script, self.calls = list(script), 0

    def energy(self, x):
        value = self.script[self.calls]
        self.calls += 1
        self.flow.weight.data.fill_(float(self.calls))
        return torch.full((len(x), 1), value)


class FakeTrainer:
    def __init__(self, generator):
        self.bg = generator


def run_script(stopper, script):
    gen = ScriptedGenerator(script)
    trainer, answers = FakeTrainer(gen), []
    for epoch in range(len(script)):
        answers.append(stopper(trainer, {"epoch": epoch}))
        if not answers[-1]:
            break
    return gen, answers


def test_it_stops_patience_epochs_after_the_best_and_restores_the_best_weights():
    stopper = EarlyStopping(torch.zeros(10, 1), patience=2)
    gen, answers = run_script(stopper, [5.0, 3.0, 4.0, 2.5, 2.6, 2.7, 1.0])
    assert answers == [True, True, True, True, True, False]  # best at epoch 3, stop at epoch 5
    assert (stopper.best, stopper.best_epoch) == (2.5, 3)
    stopper.restore(gen)
    assert gen.flow.weight.item() == 4.0  # the weights as they were at the 4th measurement


def test_the_mean_is_over_all_held_out_samples_in_chunks():
    gen = steep_well_generator()
    data = generator_target(gen).sample(1000, generator=torch.Generator().manual_seed(0))
    whole = gen.energy(data).mean().item()
    assert EarlyStopping(data, 1, chunk=64).held_out_nll(gen) == pytest.approx(whole, rel=1e-6)


def test_a_resumed_search_reads_the_best_so_far_from_its_file(tmp_path):
    path = tmp_path / "best.pt"
    first = EarlyStopping(torch.zeros(4, 1), patience=3, path=path)
    run_script(first, [2.0, 1.0, 1.5])
    again = EarlyStopping(torch.zeros(4, 1), patience=3, path=path)
    assert (again.best, again.best_epoch) == (1.0, 1)
    gen = ScriptedGenerator([9.0])
    again.restore(gen)
    assert gen.flow.weight.item() == 2.0
    assert again(FakeTrainer(ScriptedGenerator([1.2])), {"epoch": 4}) is False  # 3 epochs after the best


def test_a_process_that_does_not_write_leaves_no_file(tmp_path):
    stopper = EarlyStopping(torch.zeros(4, 1), patience=1, path=tmp_path / "best.pt", write=False)
    run_script(stopper, [1.0])
    assert not (tmp_path / "best.pt").exists() and stopper.best == 1.0


@pytest.mark.parametrize("patience", [0, -1, 1.5, True])
def test_patience_must_be_a_whole_number_of_epochs(patience):
    with pytest.raises(ValueError, match="patience must be a whole number of epochs >= 1"):
        EarlyStopping(torch.zeros(3, 1), patience)


def test_it_needs_held_out_data():
    with pytest.raises(ValueError, match="needs held-out data"):
        EarlyStopping(torch.zeros(0, 1), 2)


def test_a_callback_returning_false_ends_training_after_that_epoch(one_thread):
    torch.manual_seed(0)
    gen = steep_well_generator()
    data = generator_target(gen).sample(512, generator=torch.Generator().manual_seed(1))
    trainer = ProgressiveKLTrainer(gen, torch.optim.Adam(gen.parameters(), lr=0.01), train_energy=False,
                                   iters_per_epoch=2)
    seen = []
    history = trainer.train(n_epochs=10, data=data, batchsize=32,
                            on_epoch_end=[lambda t, r: seen.append(r["epoch"]), lambda t, r: r["epoch"] < 3])
    assert [r["epoch"] for r in history] == [0, 1, 2, 3] and seen == [0, 1, 2, 3]
    assert trainer.iteration == 8


def test_early_stopping_on_a_trainer_keeps_the_epoch_with_the_lowest_held_out_nll(one_thread):
    torch.manual_seed(0)
    gen = steep_well_generator()
    target = generator_target(gen)
    data = target.sample(256, generator=torch.Generator().manual_seed(1))
    held_out = target.sample(256, generator=torch.Generator().manual_seed(2))
    trainer = ProgressiveKLTrainer(gen, torch.optim.Adam(gen.parameters(), lr=0.05), train_energy=False,
                                   iters_per_epoch=4)
    stopper, values = EarlyStopping(held_out, patience=2), []
    trainer.train(n_epochs=40, data=data, batchsize=64,
                  on_epoch_end=[lambda t, r: values.append(stopper.held_out_nll(t.bg)), stopper])
    assert stopper.best == pytest.approx(min(values)) and values.index(min(values)) == stopper.best_epoch
    stopper.restore(gen)
    assert stopper.held_out_nll(gen) == pytest.approx(stopper.best, rel=1e-6)
    assert math.isfinite(stopper.best)


# -- RollbackOnRise ----------------------------------------------------------------------


def rollback_run(rollback, losses):
    """A steep-well trainer whose epoch records carry the scripted KL losses; the flow's shift
    is set to the epoch number before each callback, so it shows which epoch's weights are back."""
    gen = steep_well_generator()
    trainer = FakeTrainer(gen)
    trainer.optim = torch.optim.Adam(gen.parameters(), lr=0.1)
    records = []
    for epoch, loss in enumerate(losses):
        with torch.no_grad():
            gen.flow.shift.fill_(float(epoch))
        trainer.optim.param_groups[0]["lr"] = 0.1 / (epoch + 1)
        records.append({"epoch": epoch, "kll": loss, "actions": []})
        assert rollback(trainer, records[-1]) is True
    return gen, trainer, records


def test_a_rise_beyond_the_tolerance_puts_the_best_epoch_back_and_keeps_the_rate():
    rollback = RollbackOnRise(tolerance=1.0)
    gen, trainer, records = rollback_run(rollback, [290.0, 284.0, 283.5, 284.2, 288.0])
    assert rollback.rollbacks == 1 and (rollback.best, rollback.best_epoch) == (283.5, 2)
    assert gen.flow.shift.unique().tolist() == [2.0]  # epoch 2's weights
    assert trainer.optim.param_groups[0]["lr"] == pytest.approx(0.1 / 5)  # the schedule's rate of epoch 4
    assert records[3]["actions"] == [] and records[4]["actions"] == [
        "rolled back to epoch 2: KL loss 288 > best 283.5 + 1"]


def test_epochs_before_the_start_and_non_finite_losses_are_not_compared():
    rollback = RollbackOnRise(tolerance=0.5, start_epoch=2)
    gen, _, _ = rollback_run(rollback, [100.0, 101.0, 300.0, math.nan, 310.0])
    assert (rollback.best, rollback.best_epoch, rollback.rollbacks) == (300.0, 2, 1)
    assert gen.flow.shift.unique().tolist() == [2.0]


def test_the_best_state_of_a_rollback_survives_a_resume(tmp_path):
    first = RollbackOnRise(tolerance=1.0, path=tmp_path / "best.pt")
    rollback_run(first, [290.0, 283.0])
    again = RollbackOnRise(tolerance=1.0, path=tmp_path / "best.pt")
    assert (again.best, again.best_epoch) == (283.0, 1)
    gen, _, _ = rollback_run(again, [295.0])
    assert again.rollbacks == 1 and gen.flow.shift.unique().tolist() == [1.0]


@pytest.mark.parametrize("tolerance", [0, -1.0, True, "1"])
def test_the_tolerance_must_be_a_positive_number(tolerance):
    with pytest.raises(ValueError, match="tolerance must be a positive number"):
        RollbackOnRise(tolerance)


def test_after_a_rollback_the_trainer_writes_its_epoch_checkpoint_again(tmp_path):
    written = []

    class CheckpointingTrainer(FakeTrainer):
        checkpoint_path, checkpoint_every = tmp_path / "stage.pt", 1

        def save_checkpoint(self, path):
            written.append((path, self.bg.flow.shift.unique().tolist()))

    gen = steep_well_generator()
    trainer = CheckpointingTrainer(gen)
    trainer.optim = torch.optim.Adam(gen.parameters(), lr=0.1)
    rollback = RollbackOnRise(tolerance=1.0)
    for epoch, loss in enumerate([284.0, 283.0, 283.5, 290.0]):
        with torch.no_grad():
            gen.flow.shift.fill_(float(epoch))
        rollback(trainer, {"epoch": epoch, "kll": loss, "actions": []})
    assert written == [(tmp_path / "stage.pt", [1.0])]  # once, with epoch 1's weights back
