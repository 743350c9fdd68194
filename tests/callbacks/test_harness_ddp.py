"""Part (d) of the callback harness: the entries marked ``ddp="harness"`` (the callbacks with distributed
behaviour and no DDP test of their own) fit under ``strategy="ddp"`` on two gloo processes, one spawn for
all of them. What each promises under DDP is checked against what the ranks saved."""

from __future__ import annotations

import pytest
import torch

from tests.callbacks.test_harness import ENTRIES
from tests.fixtures.ddp import rank_case, spawn_and_collect
from tests.fixtures.trainers import one_thread, tiny_trainer  # noqa: F401

WORLD = 2
NAMES = sorted(name for name, entry in ENTRIES.items() if entry.ddp == "harness")


def _worker(rank, folder):
    for name in NAMES:
        with rank_case(folder, name, rank):
            entry = ENTRIES[name]
            torch.manual_seed(0)
            callback, module, data = entry.make(), entry.module(), entry.data()
            trainer = tiny_trainer(strategy="ddp", devices=WORLD, max_epochs=1, limit_val_batches=2,
                                   num_sanity_val_steps=0, default_root_dir=f"{folder}/{name}", callbacks=[callback],
                                   **entry.trainer)  # fmt: skip
            trainer.fit(module, datamodule=data)
            if entry.after is not None:
                entry.after(trainer, module, data)
            saved = {"module": module.state_dict(), "cosines": getattr(callback, "last_cosines", None),
                     "budgets": getattr(data, "budgets", None), "callback": callback.state_dict()}  # fmt: skip
            torch.save(saved, f"{folder}/{name}_rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """``name -> [what rank 0 saved, what rank 1 saved]``, or the error text."""
    folder = tmp_path_factory.mktemp("harness_ddp")
    out = spawn_and_collect(_worker, (str(folder),), folder, list(NAMES), world=WORLD, weights_only=False)
    return {name: saved if isinstance(saved, str) else [*saved, folder / name] for name, saved in out.items()}


def _saved(ranks, name):
    if isinstance(ranks[name], str):
        pytest.fail(f"{name} failed under DDP:\n{ranks[name]}")
    return ranks[name]


def test_every_harness_ddp_entry_is_checked():
    assert NAMES == ["ActiveSourceSelection", "GradientConflictMonitor", "TaskPredictionWriter"]


@pytest.mark.slow
def test_source_selection_ranks_sample_by_rank_zeros_budgets(ranks):
    first, second, _ = _saved(ranks, "ActiveSourceSelection")
    # one estimate on rank 0, broadcast: the same relevance and budgets in both callbacks and both data modules
    assert first["callback"]["budgets"] is not None and sum(first["callback"]["budgets"]) == 200
    assert first["callback"] == second["callback"]
    assert first["budgets"].tolist() == second["budgets"].tolist() == first["callback"]["budgets"]
    for key, value in first["module"].items():
        assert torch.equal(value, second["module"][key]), key


@pytest.mark.slow
def test_conflict_monitor_logs_the_same_cosines_on_every_rank(ranks):
    first, second, _ = _saved(ranks, "GradientConflictMonitor")
    assert first["cosines"] is not None and first["cosines"].shape == (2, 2)
    # the Jacobians are averaged over the ranks before the cosines: both ranks measure the same matrix
    torch.testing.assert_close(first["cosines"], second["cosines"], rtol=0, atol=1e-6)
    for key, value in first["module"].items():
        assert torch.equal(value, second["module"][key]), key


@pytest.mark.slow
def test_prediction_writer_ranks_write_their_rows_with_their_indices(ranks):
    from tests.fixtures.callback_toys import TinyClassification, TinyClassifier

    first, second, folder = _saved(ranks, "TaskPredictionWriter")
    files = sorted(folder.glob("predictions-rank*.pt"))
    assert [f.name for f in files] == ["predictions-rank0.pt", "predictions-rank1.pt"]
    written = [torch.load(f) for f in files]
    indices = torch.cat([w["indices"] for w in written])
    predictions = torch.cat([w["predictions"] for w in written])
    # each rank wrote its share; together every predict sample once (padding may repeat one)
    data = TinyClassification()
    assert set(indices.tolist()) == set(range(len(data.val_set)))
    module = TinyClassifier()
    module.load_state_dict(first["module"])
    module.eval()
    with torch.no_grad():
        expected = module(data.val_set.tensors[0][indices])
    torch.testing.assert_close(predictions, expected)
