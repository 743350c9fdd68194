"""Task hinting: the sorting data and its hints, the shared transformer, the exact-match metric, the recipes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_mtl.selection import SORTING_TASKS, SortingTasks, TaskHintingTransformer, exact_sequence_match
from lightning_mtl.selection.sorting_tasks import IGNORE, make_example, vocab_size

V = 10
SEP, PAD = V, V + 1


def _token(task: str) -> int:
    return V + 2 + SORTING_TASKS.index(task)


def _answer(tokens: torch.Tensor, targets: torch.Tensor) -> list[int]:
    return targets[targets != IGNORE].tolist()


# --- make_example: hand-written instances ------------------------------------------------------------------
def test_sort_example_by_hand_with_repeats():
    tokens, targets = make_example("sort", [3, 1, 3, 0], V)
    assert tokens.tolist() == [_token("sort"), 3, 1, 3, 0, SEP, 0, 1, 3]
    assert targets.tolist() == [IGNORE] * 5 + [0, 1, 3, 3]


@pytest.mark.parametrize(
    "values, query, answer",
    [([5, 2, 9], 0, 5), ([5, 2, 9], 1, 9), ([4, 4, 1], 1, 4), ([4, 4, 1], 0, 4), ([7, 7], 0, 7), ([1, 0, 1, 2], 2, 1)],
)
def test_successor_is_the_next_element_after_the_first_occurrence_in_sorted_order(values, query, answer):
    tokens, targets = make_example("successor", values, V, query)
    q = sorted(values)[query]
    assert tokens.tolist() == [_token("successor"), *values, SEP, q]
    assert targets.tolist() == [IGNORE] * (len(values) + 2) + [answer]


def test_copy_and_min_examples_by_hand():
    tokens, targets = make_example("copy", [2, 0, 2], V)
    assert tokens.tolist() == [_token("copy"), 2, 0, 2, SEP, 2, 0] and _answer(tokens, targets) == [2, 0, 2]
    tokens, targets = make_example("min", [6, 3, 8], V)
    assert tokens.tolist() == [_token("min"), 6, 3, 8, SEP] and _answer(tokens, targets) == [3]


def test_bad_examples_are_clear_errors():
    with pytest.raises(ValueError, match="unknown task 'reverse'"):
        make_example("reverse", [1, 2], V)
    with pytest.raises(ValueError, match=r"integers in \[0, 10\)"):
        make_example("sort", [1, 10], V)
    with pytest.raises(ValueError, match="query index"):
        make_example("successor", [1, 2], V, 1)
    with pytest.raises(ValueError, match="unknown hint task"):
        SortingTasks(hints=["sort"])


# --- the data module -------------------------------------------------------------------------------------
def _data(**kwargs) -> SortingTasks:
    defaults = dict(num_values=V, train_length=6, num_train=300, num_val=20, num_test=30, batch_size=16, seed=3)
    dm = SortingTasks(**{**defaults, **kwargs})
    dm.setup("fit")
    return dm


def test_every_training_row_is_a_correct_instance_of_its_own_task():
    dm = _data(hints=["successor", "copy", "min"], hint_ratio=1.5)
    seen: Counter[str] = Counter()
    for tokens, targets, task in dm.train_dataloader():
        assert len(set(task.tolist())) == 1  # one task per batch
        for row in range(len(tokens)):
            name = SORTING_TASKS[int(task[row])]
            seen[name] += 1
            tok = tokens[row][tokens[row] != PAD].tolist()
            assert tok[0] == _token(name)
            sep = tok.index(SEP)
            values = tok[1:sep]
            assert 2 <= len(values) <= 6 and all(0 <= v < V for v in values)
            answer = _answer(tokens[row], targets[row])
            if name == "sort":
                assert answer == sorted(values)
            elif name == "copy":
                assert answer == values
            elif name == "min":
                assert answer == [min(values)]
            else:
                q, ordered = tok[sep + 1], sorted(values)
                assert answer == [ordered[ordered.index(q) + 1]]
            # teacher forcing: the answer tokens before the last one are in the input right after the prompt
            assert tok[len(tok) - len(answer) + 1 :] == answer[:-1]
    assert seen == {"sort": 300, "successor": 150, "copy": 150, "min": 150}


def test_repeated_values_occur_and_the_buckets_have_their_lengths():
    dm = _data(num_values=4, test_lengths=[6, 12, 30])
    sep = 4  # the separator follows the four values
    repeats = 0
    for tokens, _, _ in dm.train_dataloader():
        for row in tokens.tolist():
            values = row[1 : row.index(sep)]
            repeats += len(set(values)) < len(values)
    assert repeats > 0
    for stage, loaders in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        assert dm.bucket_lengths(stage) == [6, 12, 30]
        for n, loader in zip([6, 12, 30], loaders, strict=True):
            count = 0
            for tokens, targets, task in loader:
                assert (task == SORTING_TASKS.index("sort")).all()
                assert (tokens[:, n + 1] == sep).all() and ((targets != IGNORE).sum(1) == n).all()
                count += len(tokens)
            assert count == (20 if stage == "val" else 30)


def test_distinct_values_never_repeat_and_need_a_large_enough_alphabet():
    dm = _data(num_values=12, distinct=True, test_lengths=[6, 12])
    for loader in [dm.train_dataloader(), *dm.test_dataloader()]:
        for tokens, _, _ in loader:
            for row in tokens.tolist():
                values = row[1 : row.index(12)]
                assert len(set(values)) == len(values)
    with pytest.raises(ValueError, match="distinct=True needs num_values >= the longest sequence"):
        SortingTasks(num_values=10, train_length=4, distinct=True)


def test_default_buckets_reach_five_times_the_training_length():
    assert SortingTasks(train_length=7).test_lengths == [7, 14, 21, 28, 35]


def test_seeded_and_the_hint_changes_only_the_mixture():
    def rows(dm: SortingTasks, task: str) -> list[list[int]]:
        out = []
        for tokens, _, t in dm.train_dataloader():
            out += [r for r, k in zip(tokens.tolist(), t.tolist(), strict=True) if SORTING_TASKS[k] == task]
        return sorted(out)

    hinted, again, plain = _data(hints=["successor"]), _data(hints=["successor"]), _data(hints=[])
    batches = [b[0].tolist() for b in hinted.train_dataloader()]
    assert batches == [b[0].tolist() for b in again.train_dataloader()]
    # the same sorting examples with and without the hint, and the same evaluation sets
    assert rows(hinted, "sort") == rows(plain, "sort") and len(rows(plain, "sort")) == 300
    assert rows(plain, "successor") == [] and len(rows(hinted, "successor")) == 300
    for a, b in zip(hinted.test_dataloader(), plain.test_dataloader(), strict=True):
        assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b, strict=True))
    # another seed, other data
    assert rows(_data(hints=[], seed=4), "sort") != rows(plain, "sort")


def test_ddp_ranks_take_disjoint_batches_of_equal_count():
    dm = _data(hints=["successor"])
    mixture = dm._train
    from lightning_mtl.selection.sorting_tasks import _TaskBatches

    shares = [list(_TaskBatches(mixture.offsets, 16, 3, rank, 2)) for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == len(_TaskBatches(mixture.offsets, 16, 3, 0, 2))
    flat = [i for share in shares for batch in share for i in batch]
    assert len(flat) == len(set(flat))


# --- the metric and the model ------------------------------------------------------------------------------
def _greedy_agrees(
    model: TaskHintingTransformer, num_values: int, length: int, rows: int, distinct: bool = False
) -> list[bool]:
    """Assert teacher-forced exact match equals greedy decoding on ``rows`` random sequences; return the matches."""
    matches = []
    for seed in range(rows):
        g = torch.Generator().manual_seed(seed)
        if distinct:
            values = torch.randperm(num_values, generator=g)[:length].tolist()
        else:
            values = torch.randint(0, num_values, (length,), generator=g).tolist()
        tokens, targets = make_example("sort", values, num_values)
        prompt = tokens[: length + 2].tolist()
        with torch.no_grad():
            teacher = bool(exact_sequence_match(model(tokens[None]), targets[None])[0])
            out = list(prompt)
            for _ in range(length):
                out.append(int(model(torch.tensor([out]))[0, -1].argmax()))
        assert teacher == (out[len(prompt) :] == sorted(values)), values
        matches.append(teacher)
    return matches


def test_exact_match_equals_greedy_decoding_of_a_random_model():
    torch.manual_seed(0)
    model = TaskHintingTransformer(num_values=V, d_model=16, nhead=2, num_layers=1, dim_feedforward=32).eval()
    _greedy_agrees(model, V, 4, 20)


def test_exact_match_by_hand():
    targets = torch.tensor([[IGNORE, 2, 1], [IGNORE, 0, 0]])
    logits = torch.nn.functional.one_hot(torch.tensor([[5, 2, 1], [0, 0, 3]]), 6).float()
    assert exact_sequence_match(logits, targets).tolist() == [True, False]


def test_causal_padding_never_changes_the_logits_of_earlier_tokens():
    torch.manual_seed(0)
    model = TaskHintingTransformer(num_values=V, d_model=16, nhead=2, num_layers=2, dim_feedforward=32).eval()
    tokens, _ = make_example("sort", [4, 2, 7], V)
    padded = torch.cat([tokens, torch.full((5,), PAD)])
    with torch.no_grad():
        torch.testing.assert_close(model(padded[None])[0, : len(tokens)], model(tokens[None])[0])


def test_loss_counts_the_answer_tokens_only():
    logits = torch.randn(1, 4, vocab_size(V))
    targets = torch.tensor([[IGNORE, IGNORE, 3, 1]])
    expected = torch.nn.functional.cross_entropy(logits[0, 2:], targets[0, 2:])
    torch.testing.assert_close(TaskHintingTransformer.loss(logits, targets), expected)


def _fit(hints: list[str], steps: int, precision: str = "32-true") -> tuple[TaskHintingTransformer, dict]:
    pl.seed_everything(0)
    # distinct values: at this budget the model sorts sequences without repeats; counting repeats takes
    # far longer to learn (the docs' curve)
    dm = SortingTasks(num_values=8, train_length=4, hints=hints, num_train=4000, num_val=128, batch_size=64,
                      test_lengths=[4], seed=0, distinct=True)  # fmt: skip
    model = TaskHintingTransformer(num_values=8, d_model=32, nhead=2, num_layers=2, dim_feedforward=64, lr=3e-3)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", precision=precision, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, val_check_interval=steps, check_val_every_n_epoch=None)  # fmt: skip
    trainer.fit(model, dm)
    return model, {k: float(v) for k, v in trainer.callback_metrics.items()}


@pytest.mark.slow
def test_a_short_fit_sorts_the_training_lengths_and_its_exact_match_is_greedy_decodings():
    model, metrics = _fit(["successor"], 250)
    assert metrics["val/sort/exact_len4"] > 0.9
    assert {"train/sort/loss", "train/successor/loss"} & set(metrics)
    # a trained model is right on most rows: the agreement is checked on right and wrong decodings alike
    model.eval()
    assert sum(_greedy_agrees(model, 8, 4, 20, distinct=True)) > 10
    _greedy_agrees(model, 8, 7, 20, distinct=True)


def test_bf16_mixed_trains_on_cpu():
    model, metrics = _fit([], 5, precision="bf16-mixed")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert 0.0 <= metrics["val/sort/exact_len4"] <= 1.0


def test_unknown_positional_encoding_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown positional encoding 'rope'"):
        TaskHintingTransformer(positional="rope")


@pytest.mark.parametrize("recipe", ["task_hinting", "task_hinting_no_hint"])
def test_the_recipes_run_through_the_cli(recipe, tmp_path, monkeypatch):
    from lightning_mtl.cli import main

    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[2] / f"configs/selection/{recipe}.yaml"
    cli = main(["fit", "--config", str(config), "--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false", "--trainer.logger=false", "--data.init_args.num_train=200"])  # fmt: skip
    assert cli.trainer.global_step == 1
    assert cli.datamodule.hints == ([] if recipe.endswith("no_hint") else ["successor"])


# --- resume and DDP -----------------------------------------------------------------------------------------
def _small_data() -> SortingTasks:
    # 96 sorting + 96 successor examples in batches of 16: 12 batches per epoch, several of each task
    return SortingTasks(num_values=V, train_length=5, num_train=96, num_val=8, num_test=8, batch_size=16,
                        test_lengths=[5], seed=2)  # fmt: skip


def _small_model() -> TaskHintingTransformer:
    torch.manual_seed(0)
    return TaskHintingTransformer(num_values=V, d_model=16, nhead=2, num_layers=1, dim_feedforward=32, lr=1e-2)


class _Batches(pl.Callback):
    """What each training step saw: its epoch, its task and its token rows."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, list[list[int]]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        tokens, _, task = batch
        self.seen.append((trainer.current_epoch, int(task[0]), tokens.tolist()))


def test_sampler_epochs_come_from_set_epoch_and_skip_resumes_inside_one():
    from lightning_mtl.selection.sorting_tasks import _TaskBatches

    offsets = _data(hints=["successor"])._train.offsets
    sampler = _TaskBatches(offsets, 16, 3)
    first, again = list(sampler), list(sampler)
    assert first == again  # iterating does not move the epoch: Lightning's set_epoch does
    sampler.sampler.set_epoch(1)  # the attribute Lightning calls
    second = list(sampler)
    flat = sorted(i for batch in first for i in batch)
    assert second != first and sorted(i for batch in second for i in batch) == flat  # reshuffled, every row once
    sampler.skip(1, 5)
    assert list(sampler) == second[5:]
    assert list(sampler) == second  # the skip holds for one iteration only
    sampler.skip(0, 5)
    sampler.set_epoch(1)  # another epoch than the skipped one starts at its beginning
    assert list(sampler) == second


def _resume_run(folder, ckpt_path=None):
    from lightning.pytorch.callbacks import ModelCheckpoint

    pl.seed_everything(7)
    model, record = _small_model(), _Batches()
    saver = ModelCheckpoint(dirpath=folder, every_n_train_steps=5, save_top_k=-1, filename="{step}")
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=[record, saver])  # fmt: skip
    trainer.fit(model, datamodule=_small_data(), ckpt_path=ckpt_path)
    return record.seen, model, trainer


def test_a_fit_resumed_mid_epoch_sees_the_uninterrupted_batches_and_ends_with_its_weights(tmp_path):
    full, model, _ = _resume_run(tmp_path)
    assert len(full) == 24 and {epoch for epoch, _, _ in full} == {0, 1}
    assert [t for _, t, _ in full[:12]] != [t for _, t, _ in full[12:]]  # the epochs differ in order
    for step in (5, 20):  # inside the first epoch, inside the second
        resumed, again, trainer = _resume_run(tmp_path / "again", tmp_path / f"step={step}.ckpt")
        assert resumed == full[step:], step
        assert trainer.global_step == 24
        for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


WORLD, DDP_STEPS = 2, 4


def _ddp_worker(rank, folder):
    from tests.fixtures.ddp import rank_case

    with rank_case(folder, "hinting", rank):
        model, record = _small_model(), _Batches()
        trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=WORLD, max_steps=DDP_STEPS, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
                             callbacks=[record])  # fmt: skip
        trainer.fit(model, datamodule=_small_data())
        torch.save({"seen": record.seen, "state": model.state_dict()}, f"{folder}/hinting_rank{rank}.pt")


@pytest.mark.slow
def test_ddp_takes_alternate_batches_and_steps_like_one_process_averaging_the_pair(tmp_path):
    from lightning_mtl.selection.sorting_tasks import _TaskBatches
    from tests.fixtures.ddp import spawn_and_collect

    saved = spawn_and_collect(_ddp_worker, (str(tmp_path),), tmp_path, ["hinting"], world=WORLD)["hinting"]
    assert not isinstance(saved, str), saved
    data = _small_data()
    data.setup("fit")
    single = _TaskBatches(data._train.offsets, data.batch_size, data.seed)  # one process, the same epoch
    batches = [data.collate([data._train[i] for i in indices]) for indices in single]
    # rank r trains on batches r, r + 2, r + 4, ... of the one-process order: disjoint, nothing left out
    for rank in range(WORLD):
        assert [rows for _, _, rows in saved[rank]["seen"]] == [b[0].tolist() for b in batches[rank::WORLD][:DDP_STEPS]]
    # the same step by hand in one process: AdamW on the mean of the two ranks' losses
    model = _small_model()
    optimizer = model.configure_optimizers()
    for step in range(DDP_STEPS):
        pair = batches[WORLD * step : WORLD * step + WORLD]
        optimizer.zero_grad()
        loss = sum(model.loss(model(tokens), targets) for tokens, targets, _ in pair) / WORLD
        loss.backward()
        optimizer.step()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(saved[0]["state"][name], saved[1]["state"][name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(saved[0]["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)
