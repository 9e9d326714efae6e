"""Engine pieces on their own: the data order, checkpoints, EMA."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from repae.errors import UserError
from repae.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from repae.train.data import StepOrder, step_generator
from repae.train.ema import EMA


def test_step_order_is_the_same_for_any_number_of_processes():
    single = StepOrder(dataset_size=40, batch_size=8, grad_accum=2, world_size=1, rank=0, seed=3)
    ranks = [StepOrder(40, 8, 2, 2, r, 3) for r in range(2)]
    for step in range(12):  # crosses epoch boundaries (5 steps per epoch)
        whole = single.global_batch(step)
        assert len(set(whole.tolist())) == 8
        for micro in range(2):
            joined = torch.cat([whole[o.local_slice(micro)] for o in ranks])
            assert torch.equal(joined, whole[single.local_slice(micro)])
    # resuming at step 7 continues exactly
    straight = list(single.local_batches(0, 12))
    assert list(single.local_batches(7, 12)) == straight[7 * 2 :]


def test_each_epoch_is_a_permutation_and_epochs_differ():
    order = StepOrder(12, 4, 1, 1, 0, seed=0)
    epoch0 = torch.cat([order.global_batch(s) for s in range(3)])
    epoch1 = torch.cat([order.global_batch(s) for s in range(3, 6)])
    assert sorted(epoch0.tolist()) == list(range(12)) == sorted(epoch1.tolist())
    assert not torch.equal(epoch0, epoch1)


def test_step_order_rejects_impossible_batches():
    with pytest.raises(UserError, match="larger than the dataset"):
        StepOrder(4, 8, 1, 1, 0, 0)
    with pytest.raises(UserError, match="divisible"):
        StepOrder(64, 6, 1, 4, 0, 0)


def test_step_generator_depends_on_seed_step_and_stream():
    draw = lambda *a: torch.rand(3, generator=step_generator(*a))  # noqa: E731
    assert torch.equal(draw(1, 5), draw(1, 5))
    assert not torch.equal(draw(1, 5), draw(1, 6))
    assert not torch.equal(draw(1, 5), draw(2, 5))
    assert not torch.equal(draw(1, 5, 0), draw(1, 5, 1))


def _optimizer_state():
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt


def test_checkpoint_round_trip_is_exact_and_keeps_the_last_n(tmp_path):
    model, opt = _optimizer_state()
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, models={"m": model.state_dict()}, optimizers={"m": opt.state_dict()},
                        state={"note": "x"}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000020", "step-0000030"]
    ckpt = load_checkpoint(latest_checkpoint(tmp_path))
    assert ckpt.state["step"] == 30 and ckpt.state["note"] == "x"
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt.models["m"][k], v)
    fresh = torch.optim.AdamW(nn.Linear(3, 2).parameters(), lr=1e-3)
    fresh.load_state_dict(ckpt.optimizers["m"])
    for a, b in zip(fresh.state.values(), opt.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
        assert float(a["step"]) == float(b["step"])
    assert fresh.param_groups[0]["lr"] == 1e-3
    files = sorted(p.name for p in latest_checkpoint(tmp_path).iterdir())
    assert files == ["model-m.safetensors", "optimizer-m.safetensors", "state.json"]
    json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())


def test_incomplete_checkpoints_are_ignored(tmp_path):
    model, opt = _optimizer_state()
    save_checkpoint(tmp_path, 5, models={"m": model.state_dict()}, optimizers={}, state={}, keep=3)
    (tmp_path / "checkpoints" / ".tmp-step-0000010-1").mkdir()  # a save killed half-way
    (tmp_path / "checkpoints" / "step-0000010").mkdir()  # no state.json: not complete
    assert latest_checkpoint(tmp_path).name == "step-0000005"


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "checkpoints" / "step-0000001"
    bad.mkdir(parents=True)
    (bad / "state.json").write_text("{not json")
    with pytest.raises(UserError, match="not a readable repae checkpoint"):
        load_checkpoint(bad)


def test_ema_tracks_parameters_and_float_buffers():
    live = nn.BatchNorm1d(3)
    ema = EMA({"bn": live}, decay=0.9)
    with torch.no_grad():
        live.weight.fill_(2.0)
        live.running_mean.fill_(1.0)
        live.num_batches_tracked.fill_(7)
    ema.update({"bn": live})
    shadow = ema["bn"]
    torch.testing.assert_close(shadow.weight, torch.full((3,), 1.1))
    torch.testing.assert_close(shadow.running_mean, torch.full((3,), 0.1))
    assert int(shadow.num_batches_tracked) == 7
    assert not shadow.weight.requires_grad and not shadow.training
    ema.train()
    assert not shadow.training


class _EpochTagged(torch.utils.data.Dataset):
    """Items (tensor([index, epoch]), index): shows which epoch the reading process had set."""

    def __init__(self, size: int) -> None:
        self.size, self.epoch = size, -1

    def __len__(self) -> int:
        return self.size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int):
        return torch.tensor([index, self.epoch]), index


@pytest.mark.parametrize("workers", [0, 2])
def test_one_loader_for_the_run_sets_each_items_epoch_in_the_reading_process(workers):
    """The trainer's loader spans epochs with workers started once: every item is read with its own epoch set (a
    DataLoader kept alive across epochs would otherwise freeze the workers' copies at the first epoch)."""
    from types import SimpleNamespace

    from repae.train.engine import PhasedTrainer

    order = StepOrder(dataset_size=12, batch_size=4, grad_accum=2, world_size=1, rank=0, seed=0)
    fake = SimpleNamespace(dataset=_EpochTagged(12), config=SimpleNamespace(num_workers=workers),
                           device=torch.device("cpu"))
    batches = list(PhasedTrainer.loader(fake, order, 1, 7))  # steps 1..6: epochs 0, 1 and 2
    assert len(batches) == 6 * 2
    for k, (x, labels) in enumerate(batches):
        step, micro = 1 + k // 2, k % 2
        expected = order.global_batch(step)[order.local_slice(micro)]
        assert x[:, 0].tolist() == expected.tolist() == labels.tolist()
        assert x[:, 1].tolist() == [order.epoch_of(step)] * 2
