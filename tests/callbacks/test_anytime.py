"""AnytimeEvaluation with a hand-made stream schedule and a module whose test predictions are scripted,
so every logged accuracy and the A_auc / A_avg / A_last / F_last summary are known in advance."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mtl.callbacks.anytime import AnytimeEvaluation, evaluation_plan
from tests.fixtures.ddp import SpawnDDP
from tests.fixtures.trainers import one_thread, tiny_trainer  # noqa: F401

NUM_CLASSES, PER_CLASS = 4, 4


@dataclass(frozen=True)
class Step:  # the attributes of a StreamStep
    stream_batch: int
    samples_seen: int
    num_seen: int
    task: int
    last_rep: bool
    task_end: bool


def _schedule() -> list[Step]:
    """Six stream batches of 2 samples, each trained twice (12 steps); task 0 = batches 0-2, task 1 = 3-5;
    classes exposed: 2 at batch 0, the 3rd at batch 2, the 4th at batch 3."""
    num_seen = [2, 2, 3, 4, 4, 4]
    steps = []
    for b in range(6):
        for rep in range(2):
            last = rep == 1
            steps.append(Step(b, 2 * (b + 1), num_seen[b], b // 3, last, last and b in (2, 5)))
    return steps


# per training step: how many test samples of each class the module classifies right (the first `known`)
KNOWN = [[1, 1, 0, 0]] * 3 + [[4, 2, 0, 0], [4, 2, 1, 0], [4, 3, 2, 0], [4, 3, 2, 0], [3, 3, 2, 1]]
KNOWN += [[3, 3, 2, 2]] * 3 + [[2, 4, 0, 4]]
# evaluations (eval_period 4): step 3 (4 samples), step 5 (task 0 ends), step 7 (8 samples), step 11 (12, task 1 ends)
ACCS = [6 / 8, 9 / 12, 9 / 16, 10 / 16]
A_AUC = (6 / 8 + 9 / 16 + 10 / 16) / 3  # periodic ones only: steps 3, 7, 11
A_AVG = (9 / 12 + 10 / 16) / 2
A_LAST = 10 / 16
# class accuracies at the task ends: [1, 3/4, 1/2, nan] then [1/2, 1, 0, 1]
F_LAST = ((1 - 0.5) + (0.75 - 1) + (0.5 - 0)) / 3


class FakeStream(pl.LightningDataModule):
    """A data module with the parts AnytimeEvaluation reads: schedule, num_classes, test_dataset(num_seen)."""

    def __init__(self, schedule=None, eval_batch_size=3):
        super().__init__()
        self.schedule = _schedule() if schedule is None else schedule
        self.num_classes = NUM_CLASSES
        self.eval_batch_size = eval_batch_size
        self.test_requests = []

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(len(self.schedule), 1)), batch_size=1)

    def test_dataset(self, num_seen):
        self.test_requests.append(num_seen)
        # x = (label, index of the sample within its class); classes interleaved
        rows = [(c, i) for i in range(PER_CLASS) for c in range(num_seen)]
        x = torch.tensor(rows, dtype=torch.float32)
        return TensorDataset(x, x[:, 0].long())


class ScriptedModule(pl.LightningModule):
    """Classifies test sample (label, index) right iff index < known[label] (set per step from KNOWN). The
    largest logit of every row goes to the classes not exposed yet, so only a masked evaluation scores."""

    def __init__(self, known=KNOWN, schedule=None):
        super().__init__()
        self.known_table = known
        self.seen_table = [s.num_seen for s in (schedule or _schedule())]
        self.weight = nn.Parameter(torch.zeros(1))
        self.frozen = nn.Dropout(0.5)  # held in eval mode during training, like a frozen backbone
        self.register_buffer("known", torch.zeros(NUM_CLASSES, dtype=torch.long))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.calls = []

    def on_train_start(self):
        self.frozen.eval()

    def training_step(self, batch, batch_idx):
        assert self.training and not self.frozen.training
        self.known = torch.tensor(self.known_table[batch_idx])
        self.seen = torch.tensor(self.seen_table[batch_idx])
        return (self.weight**2).sum()

    def forward(self, x):
        self.calls.append(
            (self.training, self.frozen.training, torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"))
        )
        label, index = x[:, 0].long(), x[:, 1].long()
        seen = int(self.seen)
        logits = torch.zeros(len(x), NUM_CLASSES)
        logits[:, seen:] = 10.0
        right = index < self.known[label]
        guess = torch.where(right, label, (label + 1) % seen)
        logits[torch.arange(len(x)), guess] = 1.0
        return logits

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class RecordingLogger(Logger):
    def __init__(self):
        super().__init__()
        self.calls = []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.calls.append((dict(metrics), step))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def _fit(callback, logger=None, callbacks_extra=(), **trainer_kwargs):
    data, module = FakeStream(), ScriptedModule()
    logger = logger if logger is not None else False
    trainer = tiny_trainer(callbacks=[callback, *callbacks_extra], logger=logger, **trainer_kwargs)
    trainer.fit(module, datamodule=data)
    return trainer, module, data


def test_evaluation_plan_periodic_crossings_and_task_ends():
    assert evaluation_plan(_schedule(), 4) == {3: (1, False), 5: (0, True), 7: (1, False), 11: (1, True)}
    # a stream batch larger than the period crosses two multiples at once; only last repetitions count
    steps = [Step(0, 7, 1, 0, False, False), Step(0, 7, 1, 0, True, False),
             Step(1, 9, 2, 0, True, True), Step(2, 16, 2, 1, True, True)]  # fmt: skip
    assert evaluation_plan(steps, 3) == {1: (2, False), 2: (1, True), 3: (2, True)}


def test_logged_accuracies_and_summary_match_the_hand_computed_values(capsys):
    logger = RecordingLogger()
    callback = AnytimeEvaluation(eval_period=4, log_images=False)
    trainer, module, data = _fit(callback, logger=logger)
    assert [e["step"] for e in callback.evaluations] == [3, 5, 7, 11]
    assert [e["samples_seen"] for e in callback.evaluations] == [4, 6, 8, 12]
    assert data.test_requests == [2, 3, 4, 4]  # the test samples of the classes seen at each evaluation
    assert [e["accuracy"] for e in callback.evaluations] == pytest.approx(ACCS)
    assert [e["weight"] for e in callback.evaluations] == [1, 0, 1, 1]
    # every evaluation reached the logger, whatever log_every_n_steps says
    anytime = [m for m, _ in logger.calls if "anytime/acc" in m]
    assert [m["anytime/acc"] for m in anytime] == pytest.approx(ACCS)
    assert [m["anytime/samples_seen"] for m in anytime] == [4, 6, 8, 12]
    expected = {
        "continual/A_auc": A_AUC,
        "continual/A_avg": A_AVG,
        "continual/A_last": A_LAST,
        "continual/F_last": F_LAST,
    }
    summary = next(m for m, _ in logger.calls if "continual/A_auc" in m)
    assert summary == pytest.approx(expected)
    for key, value in expected.items():
        assert float(trainer.callback_metrics[key]) == pytest.approx(value)
    assert float(trainer.callback_metrics["anytime/acc"]) == pytest.approx(ACCS[-1])
    assert callback.class_accuracies[0][:3] == [1.0, 0.75, 0.5] and math.isnan(callback.class_accuracies[0][3])
    assert callback.class_accuracies[1] == [0.5, 1.0, 0.0, 1.0]
    matrix = callback.task_accuracy_matrix()
    assert matrix[0, 0] == pytest.approx(9 / 12) and math.isnan(matrix[0, 1])
    assert matrix[1].tolist() == pytest.approx([6 / 12, 1.0])
    assert f"A_auc {100 * A_AUC:.2f}" in capsys.readouterr().out


def test_evaluation_runs_in_eval_mode_without_gradients_and_restores_each_module_mode():
    callback = AnytimeEvaluation(eval_period=4, log_images=False)
    _, module, _ = _fit(callback)
    assert module.calls and all(c[:3] == (False, False, False) for c in module.calls)
    # training_step asserted train mode for the module and eval mode for the frozen part after each evaluation


def test_evaluation_runs_under_the_precision_context():
    callback = AnytimeEvaluation(eval_period=4, log_images=False)
    _, module, _ = _fit(callback, precision="bf16-mixed")
    assert module.calls and all(c[3] for c in module.calls)
    assert callback.compute_summary()["continual/A_auc"] == pytest.approx(A_AUC)


def test_unmasked_predictions_would_score_differently():
    """The scripted module puts its largest logit on unseen classes: without the mask every evaluation
    before the last class appears would score 0, so the hand values above check the mask."""
    module = ScriptedModule()
    module.known = torch.tensor(KNOWN[3])
    module.seen = torch.tensor(2)
    x = FakeStream().test_dataset(2).tensors[0]
    assert (module(x).argmax(1) >= 2).all()


@pytest.mark.filterwarnings("ignore:.*dataloader is not resumable", "ignore:.*callbacks used to create the checkpoint")
def test_resumed_run_reports_the_same_metrics(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    full = AnytimeEvaluation(eval_period=4, log_images=False)
    # a checkpoint in the middle of the stream: after step 6, two evaluations done
    saver = ModelCheckpoint(dirpath=tmp_path, filename="mid", every_n_train_steps=7, save_top_k=-1)
    _fit(full, enable_checkpointing=True, callbacks_extra=[saver])
    assert (tmp_path / "mid.ckpt").is_file()
    resumed = AnytimeEvaluation(eval_period=4, log_images=False)
    trainer = tiny_trainer(callbacks=[resumed])
    trainer.fit(ScriptedModule(), datamodule=FakeStream(), ckpt_path=tmp_path / "mid.ckpt")
    # the two evaluations before the checkpoint came back with the state, the two after ran again
    assert [e["step"] for e in resumed.evaluations] == [3, 5, 7, 11]
    assert resumed.summary == pytest.approx(full.summary)
    assert resumed.summary["continual/A_auc"] == pytest.approx(A_AUC)
    assert float(trainer.callback_metrics["continual/F_last"]) == pytest.approx(F_LAST)


def test_state_dict_round_trip():
    callback = AnytimeEvaluation(eval_period=4, log_images=False)
    _fit(callback)
    restored = AnytimeEvaluation(eval_period=4)
    restored.load_state_dict(callback.state_dict())
    torch.save(restored.state_dict(), "state.pt")
    again = AnytimeEvaluation(eval_period=4)
    again.load_state_dict(torch.load("state.pt", weights_only=False))
    assert again.compute_summary() == pytest.approx(callback.summary, nan_ok=True)


def test_images_are_saved_as_png_without_wandb(tmp_path):
    callback = AnytimeEvaluation(eval_period=4)
    _fit(callback, default_root_dir=tmp_path)
    for name in ("anytime_accuracy.png", "accuracy_matrix.png"):
        path = tmp_path / name
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_images_go_to_the_csv_logger_folder(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path / "logs")
    _fit(AnytimeEvaluation(eval_period=4), logger=logger)
    assert (Path(logger.log_dir) / "anytime_accuracy.png").is_file()
    assert (Path(logger.log_dir) / "accuracy_matrix.png").is_file()


def test_images_go_to_wandb_through_log_image(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    sent = []
    monkeypatch.setattr(WandbLogger, "log_image", lambda self, key, images, step=None, **kw: sent.append((key, images)))
    logger = WandbLogger(offline=True, save_dir=str(tmp_path))
    callback = AnytimeEvaluation(eval_period=4)
    callback.evaluations = [dict(step=3, samples_seen=4, num_seen=2, task=0, accuracy=0.5, weight=1, task_end=True)]
    callback.class_accuracies = [[0.5, 0.5, float("nan"), float("nan")]]
    callback.class_tasks = [0, 0, 1, 1]

    class _Trainer:  # just what _draw reads; no W&B run is started
        loggers = [logger]
        global_step = 6
        fit_loop = None
        default_root_dir = str(tmp_path)

    callback._draw(_Trainer())
    assert [key for key, _ in sent] == ["continual/anytime_accuracy", "continual/accuracy_matrix"]
    image = sent[0][1][0]
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype.name == "uint8"
    assert not list(tmp_path.glob("*.png"))


def test_matrix_rows_are_labelled_by_their_task_and_a_task_without_a_task_end_is_an_empty_row():
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    callback = AnytimeEvaluation(eval_period=4)
    # the stream left task 1 (of 0..3) without samples: task ends after tasks 0, 2 and 3 only
    for step, task in ((3, 0), (7, 2), (11, 3)):
        evaluation = dict(
            step=step, samples_seen=step + 1, num_seen=4, task=task, accuracy=0.5, weight=1, task_end=True
        )
        callback.evaluations.append(evaluation)
    nan = float("nan")
    callback.class_accuracies = [[0.5, 1.0, nan, nan], [0.25, 0.75, 1.0, nan], [0.0, 0.5, 0.5, 1.0]]
    callback.class_tasks = [0, 0, 2, 3]
    figure = callback._heatmap(Figure)
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_yticklabels()] == ["1", "2", "3", "4"]
    assert [t.get_text() for t in axes.get_xticklabels()] == ["1", "2", "3", "4"]
    shown = np.ma.filled(np.ma.asarray(axes.images[0].get_array(), dtype=float), np.nan)
    by_task_end = 100 * callback.task_accuracy_matrix().numpy()  # one row per task end, in order
    np.testing.assert_allclose(shown[[0, 2, 3]], by_task_end)
    assert np.isnan(shown[1]).all()


def test_without_matplotlib_images_are_skipped_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    callback = AnytimeEvaluation(eval_period=4)
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        _fit(callback, default_root_dir=tmp_path)
    assert not list(tmp_path.glob("*.png"))
    assert callback.summary["continual/A_last"] == pytest.approx(A_LAST)


def test_setup_fails_clearly_without_a_schedule():
    class NoSchedule(pl.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=1)

    trainer = tiny_trainer(callbacks=[AnytimeEvaluation()])
    with pytest.raises(ValueError, match="needs a data module with a `schedule`"):
        trainer.fit(ScriptedModule(), datamodule=NoSchedule())


def test_argument_errors():
    with pytest.raises(ValueError, match="eval_period"):
        AnytimeEvaluation(eval_period=0)
    with pytest.raises(ValueError, match="eval_batch_size"):
        AnytimeEvaluation(eval_batch_size=0)


class _SaveSummary(pl.Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_fit_end(self, trainer, pl_module):
        anytime = next(c for c in trainer.callbacks if isinstance(c, AnytimeEvaluation))
        samples = sum(len(x) for x, _ in anytime._loader(trainer, NUM_CLASSES))
        result = {"summary": anytime.summary, "accs": [e["accuracy"] for e in anytime.evaluations], "share": samples}
        (self.folder / f"anytime_rank{trainer.global_rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_ranks_evaluate_shares_and_sum_the_counts(tmp_path):
    """Two processes: each evaluates half of the test samples; the summed counts give the single-process
    accuracies and summary on every rank."""
    trainer = tiny_trainer(strategy=SpawnDDP(), devices=2, use_distributed_sampler=False,
                           callbacks=[AnytimeEvaluation(eval_period=4, log_images=False), _SaveSummary(tmp_path)])  # fmt: skip
    trainer.fit(ScriptedModule(), datamodule=FakeStream())
    results = [json.loads((tmp_path / f"anytime_rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["share"] for r in results] == [NUM_CLASSES * PER_CLASS // 2] * 2
    expected = {
        "continual/A_auc": A_AUC,
        "continual/A_avg": A_AVG,
        "continual/A_last": A_LAST,
        "continual/F_last": F_LAST,
    }
    for r in results:
        assert r["accs"] == pytest.approx(ACCS)
        assert r["summary"] == pytest.approx(expected)
