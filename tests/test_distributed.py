"""Data-parallel training: two gloo ranks on the CPU agree on every skip and stay identical."""

from __future__ import annotations

import math

import pytest
import torch

from bgflow_gate.distributed import Ranks, init_from_env, rank_seed
from bgflow_gate.stats import BINS_PER_DECADE

import distributed_workers as workers

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")


def run(tmp_path, fn, *args, world=2):
    codes = workers.spawn(fn, world, tmp_path, *args)
    assert None not in codes, f"a rank did not finish (deadlock): exit codes {codes}"
    return codes, [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def same_history(a, b):
    keep = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    return repr(keep(a)) == repr(keep(b))  # repr: NaN equals NaN


@pytest.mark.parametrize("skip_policy, value", [("batch", math.nan), ("drop", 1e13)])
def test_skips_forced_on_one_rank_are_taken_by_both_and_the_parameters_stay_identical(tmp_path, skip_policy, value):
    codes, (r0, r1) = run(tmp_path, workers.forced_skips, skip_policy, value)
    assert codes == [0, 0] and r0["ranks"] == 2
    for key in r0["params"]:
        assert torch.equal(r0["params"][key], r1["params"][key]), key
    assert same_history(r0["history"], r1["history"])
    poisoned = 20 // 3  # rank 1 gates 200 of its 256 samples on every third of 20 KL batches
    skipped = sum(r["batches_skipped"] for r in r0["history"])
    # "batch": one gated sample anywhere skips the global batch; "drop": 312 of 512 kept >= half
    assert skipped == (poisoned if skip_policy == "batch" else 0)
    assert r0["params"]["_flow.shift"].abs().max() > 0.1  # training moved the flow
    assert not torch.equal(r0["data_first"], r1["data_first"])  # disjoint shards of the data


def test_a_rank_whose_energies_are_all_nan_leaves_half_the_global_batch_to_train_on(tmp_path):
    codes, (r0, r1) = run(tmp_path, workers.forced_skips, "drop", math.nan, 256)
    assert codes == [0, 0]
    for key in r0["params"]:
        assert torch.equal(r0["params"][key], r1["params"][key]), key
    assert sum(r["nonfinite"] for r in r0["history"]) == 6 * 256  # every third of 20 batches, all NaN
    assert sum(r["batches_skipped"] for r in r0["history"]) == 0  # 256 of 512 kept: min_keep_fraction 0.5


def test_the_history_holds_the_statistics_of_both_ranks_together(tmp_path):
    _, (r0, r1) = run(tmp_path, workers.forced_skips, "drop", 1e13)
    per_epoch = 5  # KL batches per epoch, one target call each
    for epoch, record in enumerate(r0["history"]):
        calls = slice(epoch * per_epoch * 256, (epoch + 1) * per_epoch * 256)
        raw = torch.cat([r0["raw"][calls], r1["raw"][calls]]).double()
        assert record["samples"] == 2 * per_epoch * 256
        assert record["batches"] == per_epoch  # global batches, one per iteration
        assert record["nonfinite"] == 0
        assert record["samples_gated"] == int((raw > 1e12).sum()) > 0  # E_max 1e12
        assert record["energy_max"] == raw.max().item() == 1e13
        median = raw.sort().values[int(round(0.5 * (len(raw) - 1)))].item()
        assert record["energy_p50"] == pytest.approx(median, rel=2.4 * math.log(10) / BINS_PER_DECADE)
    raw = torch.cat([r0["raw"], r1["raw"]]).double()
    assert r0["total"]["energy_min"] == r1["total"]["energy_min"] == raw.min().item()
    assert r0["total"]["samples"] == len(raw)


def test_samples_one_rank_s_engine_refuses_are_gated_and_training_goes_on(tmp_path):
    codes, (r0, r1) = run(tmp_path, workers.failing_rank, False)
    assert codes == [0, 0] and r0["error"] is None and r1["error"] is None
    for key in r0["params"]:
        assert torch.equal(r0["params"][key], r1["params"][key])
    gated = sum(r["samples_gated"] for r in r0["history"])
    assert gated == r1["refused"] > 0 and r0["refused"] == 0
    assert sum(r["batches"] - r["batches_skipped"] for r in r0["history"]) > 0


def test_a_dead_engine_on_one_rank_stops_every_rank_instead_of_hanging(tmp_path):
    codes, (r0, r1) = run(tmp_path, workers.failing_rank, True)
    assert codes == [0, 0]  # both came back from train() with an error, within the time limit
    assert r1["error"] == "RuntimeError: engine failure on rank 1"
    assert r0["error"].startswith("RankFailure: iteration 2: training failed on 1 other rank(s)")
    assert len(r0["history"]) == len(r1["history"]) == 0


def test_an_error_in_work_done_by_rank_0_alone_reaches_every_rank(tmp_path):
    codes, (r0, r1) = run(tmp_path, workers.rank0_fails)
    assert codes == [0, 0]
    assert r0["error"] == "ValueError: the run directory is occupied"
    assert r1["error"] == "RankFailure: rank 0 failed: ValueError: the run directory is occupied"


def test_a_run_killed_under_two_ranks_resumes_to_the_same_result(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    _, full = run(straight, workers.checkpointed)
    codes = workers.spawn(workers.checkpointed, 2, killed, 11)  # dies in epoch 2 (calls 9-12)
    assert codes == [9, 9]
    assert torch.load(killed / "ckpt.pt", weights_only=False)["iteration"] == 8
    _, resumed = run(killed, workers.checkpointed, None, True)
    for rank in range(2):
        for key, value in full[rank]["params"].items():
            assert torch.equal(value, resumed[rank]["params"][key]), (rank, key)
        assert same_history(full[rank]["history"], resumed[rank]["history"])
    assert len(full[0]["history"]) == 6
    assert not torch.equal(full[0]["raw"], full[1]["raw"])  # each rank has its own random stream


def test_a_checkpoint_of_two_ranks_needs_two_ranks_and_says_so(tmp_path):
    run(tmp_path, workers.checkpointed)
    _, data, trainer = workers.make_trainer(0, ddp=False)
    with pytest.raises(ValueError, match=r"written by 2 process\(es\) and this run has 1.*nproc_per_node=2"):
        trainer.resume(tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    trainer.bg.load_state_dict(state["bg"])  # the weights alone load without DDP


def test_single_process_ranks_are_identities():
    ranks = Ranks(None)
    t = torch.arange(3.0)
    assert ranks.size == 1 and ranks.is_main and not ranks.distributed
    assert ranks.all_reduce([t])[0] is t
    assert ranks.shard(t) is t
    assert ranks.gather({"a": 1}) == [{"a": 1}]
    assert ranks.on_main(lambda: 5) == 5


def test_rank_seeds_differ_per_rank_and_repeat():
    seeds = [rank_seed(123, r) for r in range(4)]
    assert len(set(seeds)) == 4 and seeds == [rank_seed(123, r) for r in range(4)]
    assert all(0 <= s < 2**63 for s in seeds)


def test_outside_torchrun_no_process_group_is_started(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env("cpu") is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_from_env("cuda") is None
    assert not torch.distributed.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_more_gpu_processes_than_gpus_is_an_error_that_says_what_to_do(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK 0 has no GPU: this machine has 0.*--device cpu"):
        init_from_env("cuda")
