"""One harness for every callback the package exports (as the aggregator registry tests do for aggregators).

Each entry of ``ENTRIES`` builds the callback and a tiny module and data that fit it. For every entry:

* (a) ``state_dict()`` after a short run survives ``load_state_dict()`` into a fresh callback and a save
  and load through ``torch.save``;
* (b) a run stopped at a checkpoint and resumed from it ends with the callback state (and the module's
  weights) of the uninterrupted run;
* (c) ``accumulate_grad_batches=2`` works as the callback documents, or is refused at setup naming the flag;
* (d) callbacks with distributed behaviour run under two gloo processes (``test_harness_ddp.py``), or name
  the existing DDP test that covers them.

``test_every_exported_callback_has_an_entry`` fails when the package exports a callback without an entry.
Where an existing test already covers (b) or (d) thoroughly the entry names it instead of running it twice.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import io
import math
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_mtl
from tests.fixtures.callback_toys import TinyClassification, TinyClassifier
from tests.fixtures.ssl_toys import FixedFeatureModule, ToyData
from tests.fixtures.trainers import one_thread, tiny_module, tiny_multidigits, tiny_trainer  # noqa: F401

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*dataloader is not resumable", "ignore:.*callbacks used to create the checkpoint",
    "ignore:.*does not have many workers", "ignore:.*smaller than the logging interval",
)  # fmt: skip


@dataclass
class Entry:
    """How the harness runs one callback.

    Attributes:
        make: a fresh callback.
        module: a fresh LightningModule that fits it.
        data: a fresh LightningDataModule that fits it.
        epochs: the uninterrupted run; the interrupted one stops after ``epochs // 2`` (``resume="epoch"``).
        resume: ``"epoch"``: stop at an epoch end; ``"step"``: stop after ``stop_step`` steps of a
            one-epoch stream; ``"test::<module>::<name>"``: that existing test covers the resume.
        stop_step: the step of the mid-stream checkpoint (``resume="step"``).
        accumulate: ``"works"`` or ``"refused"`` (with ``accumulate_grad_batches=2``).
        check_accumulate: what "works" means for this callback, given the callback and the trainer.
        ddp: ``None`` (nothing distributed), ``"harness"`` (run in ``test_harness_ddp.py``) or
            ``"test::<module>::<name>"`` (an existing DDP test).
        observe: what must agree after a resume; the callback's ``state_dict()`` by default.
        deterministic: the module's weights after a resume equal the uninterrupted run's.
        after: run after ``fit`` (e.g. ``predict``), given the trainer, module and data.
        trainer: extra Trainer arguments.
    """

    make: Callable[[], pl.Callback]
    module: Callable[[], pl.LightningModule] = TinyClassifier
    data: Callable[[], pl.LightningDataModule] = TinyClassification
    epochs: int = 2
    resume: str = "epoch"
    stop_step: int = 0
    accumulate: str = "works"
    check_accumulate: Callable[[Any, pl.Trainer], None] | None = None
    ddp: str | None = None
    observe: Callable[[Any, pl.Trainer], Any] | None = None
    deterministic: bool = True
    after: Callable[[pl.Trainer, pl.LightningModule, pl.LightningDataModule], None] | None = None
    trainer: dict[str, Any] = field(default_factory=dict)


# -- the entries --------------------------------------------------------------------------------------
def _save_config_callback():
    from jsonargparse import ArgumentParser

    from lightning_mtl.cli import LoggerSaveConfigCallback

    parser = ArgumentParser()
    parser.add_argument("--lr", type=float, default=0.1)
    return LoggerSaveConfigCallback(parser, parser.parse_args([]))


def _updates_per_optimizer_step(attribute):
    def check(callback, trainer):
        assert getattr(callback, attribute) == trainer.global_step == 2  # 4 batches, 2 optimizer steps

    return check


def _measured_at_optimizer_steps(callback, trainer):
    # 4 batches, 2 optimizer steps: measured once, at step 2, on the first batch that ended there
    assert trainer.global_step == 2 and callback._measured_at == 2 and callback.last_cosines is not None


def _predictions(callback, trainer):
    from lightning_mtl.callbacks.run_summary import run_folder

    return torch.load(run_folder(trainer) / callback.filename)


def _predict(trainer, module, data):
    trainer.predict(module, datamodule=data, return_predictions=False)


def _anytime_stream():
    from tests.callbacks.test_anytime import FakeStream

    return FakeStream()


def _anytime_module():
    from tests.callbacks.test_anytime import ScriptedModule

    return ScriptedModule()


def _vor_stream():
    from tests.continual.test_vor import _FakeStream

    return _FakeStream()


def _vor_module():
    from tests.continual.test_vor import _FakeModule

    return _FakeModule()


def _vor():
    from tests.continual.test_vor import _vor

    return _vor(epochs=3)


def _same_evaluations(callback, trainer):
    # one StreamStep per batch, whatever the accumulation: the evaluations of the plain run
    assert [e["step"] for e in callback.evaluations] == [3, 5, 7, 11]


def _ema():
    from lightning_mtl.callbacks import EMATeacher

    return EMATeacher(decay=0.9, schedule="cosine", final_decay=0.99)


def _sam():
    from lightning_mtl.sharpness import SharpnessAwareMinimization

    return SharpnessAwareMinimization(rho=0.05)


def _mixup():
    from lightning_mtl.mixup import MixBatch, Mixup

    return MixBatch(Mixup(alpha=1.0), num_classes=3)


def _callbacks(name):
    return getattr(importlib.import_module("lightning_mtl.callbacks"), name)


def _digits_sources():
    from lightning_mtl.selection import DigitsSources

    return DigitsSources(total_budget=200, batch_size=20, seed=0)


def _digits_multitask():
    from lightning_mtl import ClassificationTask, MultiTaskModule
    from lightning_mtl.selection import DigitsMLP

    names = _digits_sources().source_names
    return MultiTaskModule(DigitsMLP(), {name: ClassificationTask(2) for name in names})


def _budgets_follow_the_relevance(callback, trainer):
    # accumulation changes nothing at the epoch's end: one estimate, budgets summing to the total, in the data
    data = trainer.datamodule
    assert callback.budgets is not None and int(callback.budgets.sum()) == data.total_budget
    assert data.budgets.tolist() == callback.budgets.tolist()


def _controllable_module():
    from tests.controllable.test_module import _module

    return _module()


def _controllability():
    from lightning_mtl.controllable import ControllabilityEvaluation

    return ControllabilityEvaluation(budgets=(0.25, 0.5))


def _grid_after_the_last_step(callback, trainer):
    # the grid is computed once, after fit, from the weights of the 1 optimizer step of 2 batches
    assert trainer.num_training_batches == 2 and trainer.global_step == 1 and callback.results is not None
    assert sorted(callback.results["controllability"]) == [0.25, 0.5]


@functools.cache
def _pairs_tokenizer():
    from lightning_mtl.embeddings import PairsDataModule

    data = PairsDataModule(per_domain=40, val_fraction=0.25, batch_size=16, vocab_size=400)
    data.setup("fit")
    return data.tokenizer


def _pairs_data():
    from lightning_mtl.embeddings import PairsDataModule

    data = PairsDataModule(per_domain=40, val_fraction=0.25, batch_size=16, vocab_size=400)
    # one vocabulary for every run, as a resumed run loads its saved tokenizer: two WordPiece trainings on
    # the same texts can break ties differently, and the resumed weights would then read other tokens
    data.tokenizer = _pairs_tokenizer()
    return data


def _bi_encoder():
    from lightning_mtl.embeddings import BiEncoder

    config = dict(model_type="bert", vocab_size=400, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=128,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    return BiEncoder(config=config, num_experts=3)


def _logged(prefix):
    def observe(callback, trainer):
        return {k: v for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}

    return observe


def _logged_after_the_last_step(prefix):
    def check(callback, trainer):
        assert trainer.global_step == 2  # 4 batches, 2 optimizer steps
        assert any(k.startswith(prefix) for k in trainer.callback_metrics)

    return check


def _embeddings(name):
    return getattr(importlib.import_module("lightning_mtl.embeddings"), name)


def _levi_module():
    from lightning_mtl.architectures import DigitsCNN
    from lightning_mtl.finetuning import LEVI

    torch.manual_seed(0)
    return LEVI(10, backbone=DigitsCNN(channels=(4, 8), out_features=16), layers=["features.5", "project"],
                input_shape=[1, 8, 8], small_width=4, adapter_hidden=8)  # fmt: skip


def _levi_digits():
    from lightning_mtl.datamodules import Digits

    return Digits(batch_size=32, split_fractions=(0.1, 0.05, 0.85), seed=0)


ENTRIES: dict[str, Entry] = {
    "ActiveSourceSelection": Entry(
        make=lambda: importlib.import_module("lightning_mtl.selection").ActiveSourceSelection(),
        module=_digits_multitask,
        data=_digits_sources,
        check_accumulate=_budgets_follow_the_relevance,
        trainer=dict(use_distributed_sampler=False),  # the data module's sampler shards by rank itself
        ddp="harness",  # rank 0's budgets are broadcast to every rank's sampler
    ),
    "AnytimeEvaluation": Entry(
        make=lambda: _callbacks("AnytimeEvaluation")(eval_period=4, log_images=False, verbose=False),
        module=_anytime_module,
        data=_anytime_stream,
        epochs=1,
        resume="step",
        stop_step=7,
        check_accumulate=_same_evaluations,
        ddp="test::tests.callbacks.test_anytime::test_ranks_evaluate_shares_and_sum_the_counts",
    ),
    "BestMetricsSummary": Entry(make=lambda: _callbacks("BestMetricsSummary")(), epochs=3),
    "ConfigHyperparameters": Entry(
        make=lambda: importlib.import_module("lightning_mtl.cli").ConfigHyperparameters({"lr": 0.1}, ["val/acc"])
    ),
    "ControllabilityEvaluation": Entry(
        make=_controllability,
        module=_controllable_module,
        data=lambda: tiny_multidigits(num_train=64, num_val=64, batch_size=32),
        observe=lambda callback, trainer: callback.results,
        check_accumulate=_grid_after_the_last_step,
    ),
    "EMATeacher": Entry(
        make=_ema,
        check_accumulate=_updates_per_optimizer_step("num_updates"),
        ddp="test::tests.callbacks.test_ema::test_ddp_ranks_evaluate_the_same_callback_teacher",
    ),
    "GradientConflictMonitor": Entry(
        make=lambda: _callbacks("GradientConflictMonitor")(every_n_steps=2, log_image=False),
        module=tiny_module,
        data=lambda: tiny_multidigits(num_train=64, num_val=16, batch_size=16),
        observe=lambda callback, trainer: callback.last_cosines,
        check_accumulate=_measured_at_optimizer_steps,
        ddp="harness",
    ),
    "KNNMonitor": Entry(
        make=lambda: _callbacks("KNNMonitor")(k=5),
        module=FixedFeatureModule,
        data=lambda: ToyData(n_train=32, n_val=16, batch_size=8),
        observe=lambda callback, trainer: float(trainer.callback_metrics["val/knn/acc"]),
        ddp="test::tests.callbacks.test_knn::test_monitor_gathers_the_bank_across_ranks",
    ),
    "LEVIFeatureCache": Entry(
        make=lambda: importlib.import_module("lightning_mtl.finetuning").LEVIFeatureCache(),
        module=_levi_module,
        data=_levi_digits,
        ddp="test::tests.finetuning.test_levi_ddp::test_a_ddp_step_equals_the_single_process_step_on_the_concatenated_batch",
    ),
    "LoggerSaveConfigCallback": Entry(make=_save_config_callback),
    "MixBatch": Entry(
        make=_mixup, data=lambda: TinyClassification(image=True), deterministic=False
    ),  # mixes with torch's global generator, not checkpointed
    "OnlineLinearProbe": Entry(
        make=lambda: _callbacks("OnlineLinearProbe")(num_classes=4, lr=0.05),
        module=FixedFeatureModule,
        data=lambda: ToyData(n_train=32, n_val=16, batch_size=8),
        ddp="test::tests.callbacks.test_linear_probe::test_probe_copies_stay_identical_under_ddp",
    ),
    "PairClassificationEvaluation": Entry(
        make=lambda: _embeddings("PairClassificationEvaluation")(),
        module=_bi_encoder,
        data=_pairs_data,
        check_accumulate=_logged_after_the_last_step("val/pair/"),
    ),
    "RetrievalEvaluation": Entry(
        make=lambda: _embeddings("RetrievalEvaluation")(ks=(1, 5)),
        module=_bi_encoder,
        data=_pairs_data,
        observe=_logged("val/retrieval/"),
        check_accumulate=_logged_after_the_last_step("val/retrieval/"),
    ),
    "RunSummary": Entry(make=lambda: _callbacks("RunSummary")(), observe=lambda callback, trainer: callback.metrics),
    "SharpnessAwareMinimization": Entry(
        make=_sam,
        check_accumulate=_updates_per_optimizer_step("steps"),
        ddp="test::tests.sharpness.test_sam_ddp::test_ddp_sam_equals_per_rank_perturbation_by_hand",
    ),
    "SigtermCheckpoint": Entry(make=lambda: importlib.import_module("lightning_mtl.cli").SigtermCheckpoint()),
    "TaskPredictionWriter": Entry(
        make=lambda: _callbacks("TaskPredictionWriter")(),
        after=_predict,
        observe=_predictions,
        ddp="harness",
    ),
    "VirtualOutlierRegularization": Entry(
        make=_vor,
        module=_vor_module,
        data=_vor_stream,
        epochs=1,
        resume="step",
        stop_step=2,
        trainer=dict(use_distributed_sampler=False),
        ddp="test::tests.continual.test_vor::test_ddp_ranks_share_features_outliers_and_head",
    ),
}


# -- discovery ------------------------------------------------------------------------------------
def exported_callbacks() -> dict[str, type]:
    """Every public ``Callback`` subclass in the ``__all__`` of the package and of its public modules."""
    modules = [lightning_mtl] + [
        importlib.import_module(f"lightning_mtl.{info.name}")
        for info in pkgutil.iter_modules(lightning_mtl.__path__)
        if not info.name.startswith("_")
    ]
    found: dict[str, type] = {}
    for module in modules:
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if inspect.isclass(obj) and issubclass(obj, pl.Callback) and not name.startswith("_"):
                found[obj.__name__] = obj
    return found


def test_every_exported_callback_has_an_entry():
    exported = exported_callbacks()
    assert sorted(exported) == sorted(ENTRIES), "give every exported callback a harness entry (and only those)"
    for name, entry in ENTRIES.items():
        assert type(entry.make()) is exported[name]


# -- comparisons ----------------------------------------------------------------------------------
def assert_same(a: Any, b: Any, path: str = "state") -> None:
    """Equal structure, and equal values (floats and float tensors to rounding, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: tensor vs {type(b).__name__}"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True, msg=lambda m: f"{path}: {m}")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(map(str, a)) == sorted(map(str, b)), f"{path}: keys differ"
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert isinstance(b, (float, int)) and (a == pytest.approx(b, rel=1e-5) or math.isnan(a) and math.isnan(b)), (
            f"{path}: {a} != {b}"
        )
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _observe(entry: Entry, callback: Any, trainer: pl.Trainer) -> Any:
    return entry.observe(callback, trainer) if entry.observe else callback.state_dict()


# -- the runs -------------------------------------------------------------------------------------
def _fit(entry: Entry, folder, ckpt_path=None, **kwargs) -> tuple[Any, pl.Trainer, pl.LightningModule]:
    torch.manual_seed(0)  # the same global generator in every run (MixBatch's draws, dropout)
    callback, module, data = entry.make(), entry.module(), entry.data()
    extra = kwargs.pop("callbacks", [])
    options = dict(max_epochs=entry.epochs, limit_val_batches=2, num_sanity_val_steps=0, default_root_dir=folder)
    options.update(entry.trainer)
    options.update(kwargs)
    trainer = tiny_trainer(callbacks=[callback, *extra], **options)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    if entry.after is not None:
        entry.after(trainer, module, data)
    return callback, trainer, module


class _StopAt(pl.Callback):
    """Stops the fit after epoch ``epoch`` (counted from 1) or at global step ``step``."""

    def __init__(self, epoch: int | None = None, step: int | None = None):
        self.epoch, self.step, self.stopped = epoch, step, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.step is not None and trainer.global_step == self.step:
            trainer.should_stop = self.stopped = True

    def on_train_epoch_end(self, trainer, pl_module):
        if self.epoch is not None and trainer.current_epoch + 1 == self.epoch:
            trainer.should_stop = self.stopped = True


@functools.cache
def _runs(name: str, root: str) -> dict[str, Any]:
    """The uninterrupted run and, unless an existing test covers it, the stopped and resumed one."""
    import pathlib

    entry, root_path = ENTRIES[name], pathlib.Path(root)
    callback, trainer, module = _fit(entry, root_path / "full")
    out = {"full": (callback, trainer, module)}
    if entry.resume in ("epoch", "step"):
        # stopped as a crash would stop it: same Trainer arguments (horizons unchanged), checkpoint, then stop
        saves = root_path / "saves"
        if entry.resume == "epoch":
            saver = ModelCheckpoint(dirpath=saves, filename="stop", save_top_k=-1)
            stopper = _StopAt(epoch=entry.epochs // 2)
        else:
            saver = ModelCheckpoint(dirpath=saves, filename="stop", every_n_train_steps=entry.stop_step, save_top_k=-1)
            stopper = _StopAt(step=entry.stop_step)
        _fit(entry, root_path / "stopped", callbacks=[saver, stopper], enable_checkpointing=True)
        assert stopper.stopped
        out["resumed"] = _fit(entry, root_path / "resumed", ckpt_path=saves / "stop.ckpt")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    return lambda name: _runs(name, str(root / name))


NAMES = sorted(ENTRIES)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name, runs):
    callback = runs(name)["full"][0]
    state = callback.state_dict()
    fresh = ENTRIES[name].make()
    fresh.load_state_dict(copy.deepcopy(state))
    assert_same(fresh.state_dict(), state)
    # and through a file, as in a checkpoint
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    again = ENTRIES[name].make()
    again.load_state_dict(torch.load(buffer, weights_only=False))
    assert_same(again.state_dict(), state)


@pytest.mark.parametrize("name", NAMES)
def test_resume_ends_like_the_uninterrupted_run(name, runs):
    entry = ENTRIES[name]
    if entry.resume.startswith("test::"):
        _, module, test = entry.resume.split("::")
        assert callable(getattr(importlib.import_module(module), test)), f"{entry.resume} is gone"
        return
    full, resumed = runs(name)["full"], runs(name)["resumed"]
    assert resumed[1].global_step == full[1].global_step > 0
    assert_same(_observe(entry, resumed[0], resumed[1]), _observe(entry, full[0], full[1]), f"{name} state")
    if entry.deterministic:
        assert_same(resumed[2].state_dict(), full[2].state_dict(), f"{name} module")


@pytest.mark.parametrize("name", NAMES)
def test_gradient_accumulation(name, tmp_path):
    entry = ENTRIES[name]
    kwargs = dict(accumulate_grad_batches=2, max_epochs=1)
    if entry.resume == "epoch":  # the streams' schedules need their whole epoch
        kwargs["limit_train_batches"] = 4
    if entry.accumulate == "refused":
        with pytest.raises((ValueError, RuntimeError), match="accumulate_grad_batches"):
            _fit(entry, tmp_path, **kwargs)
        return
    callback, trainer, _ = _fit(entry, tmp_path, **kwargs)
    assert trainer.state.finished
    if entry.check_accumulate is not None:
        entry.check_accumulate(callback, trainer)


@pytest.mark.parametrize("name", [n for n in NAMES if (ENTRIES[n].ddp or "").startswith("test::")])
def test_distributed_behaviour_is_covered_by_a_ddp_test(name):
    _, module, test = ENTRIES[name].ddp.split("::")
    function = getattr(importlib.import_module(module), test)
    assert any(mark.name == "slow" for mark in getattr(function, "pytestmark", [])), f"{test} is not marked slow"
