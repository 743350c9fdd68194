"""ZIP-FIT: exact NCD and sizes against the reference compressors, agreement with the official package, the
score cache, the data-module wrapper, the stdlib recipe (top K mostly code) and the recipe configs."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import random
import sys
import time
import types
import zlib
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_mtl.selection import (
    ByteLM,
    CompressionSelected,
    CompressionSelector,
    StdlibCorpus,
    _compress,
    _forked,
    ncd,
    zipfit,
)
from lightning_mtl.selection._compress import COPY_THRESHOLD, pair_sizes
from tests.fixtures.ddp import SpawnDDP

ROOT = Path(__file__).resolve().parents[2]
CODE = "def add(a, b):\n    total = a + b\n    return total\n"
LONG_CODE = "".join(f"def f{i}(x):\n    return x * {i} + helper(x, {i})\n\n" for i in range(80))  # > threshold
PROSE = "Return the sum of two numbers; the docstring explains what a caller gets back and why."
NOISE = "qzv xkw jpl mmr tyu bnh wqe zzk plo qwr yyt nnm vbc xcv lkj hgf dsa poi uyt rew"


def gzip_size(text: str, level: int = 9) -> int:
    return len(gzip.compress(text.encode("utf-8"), compresslevel=level))


@pytest.fixture(scope="module")
def corpus() -> StdlibCorpus:
    data = StdlibCorpus(per_kind=60, num_targets=20, num_val=10)
    data.setup("fit")
    return data


def test_ncd_of_hand_numbers():
    assert ncd(10, 20, 25) == (25 - 10) / 20
    assert ncd(20, 10, 25) == ncd(10, 20, 25)  # min / max, whichever comes first


def test_alignment_equals_a_hand_computation_with_gzip():
    sources, targets = [CODE, LONG_CODE, PROSE, "", "ünïcödé ✓ " * 30], [CODE, PROSE + CODE]
    scores = CompressionSelector("gzip", 9, num_workers=0).score(sources, targets)
    for source, score in zip(sources, scores):
        distances = []
        for target in targets:
            c_x, c_y, c_xy = gzip_size(source), gzip_size(target), gzip_size(source + target)
            distances.append((c_xy - min(c_x, c_y)) / max(c_x, c_y))
        assert score == pytest.approx(1 - sum(distances) / len(distances), abs=1e-15)


@pytest.mark.parametrize("level", [1, 6, 9])
@pytest.mark.parametrize("backend", ["gzip", "zlib"])
def test_copied_compressor_state_gives_the_one_shot_length(backend, level):
    reference = (lambda d: len(gzip.compress(d, level))) if backend == "gzip" else (lambda d: len(zlib.compress(d, level)))  # fmt: skip
    rng = random.Random(level)
    # below and above the copy threshold, past the 32 KiB window, empty texts and multi-byte characters
    sources = [b"", CODE.encode(), LONG_CODE.encode(), LONG_CODE.encode() * 20, "é✓".encode() * 900,
               bytes(rng.getrandbits(8) for _ in range(3000))]  # fmt: skip
    targets = [
        b"",
        CODE.encode(),
        PROSE.encode(),
        LONG_CODE.encode()[:700],
        bytes(rng.getrandbits(8) for _ in range(500)),
    ]
    assert max(len(s) for s in sources) > 32768 and any(len(s) >= COPY_THRESHOLD for s in sources)
    for source in sources:
        alone, together = pair_sizes(source, targets, backend, level)
        assert alone == reference(source)
        assert together == [reference(source + target) for target in targets]


@pytest.mark.parametrize("threshold", [0, 10**9])
def test_both_pair_paths_agree(monkeypatch, threshold):
    sources, targets = [CODE, LONG_CODE, PROSE], [CODE, NOISE]
    expected = CompressionSelector(num_workers=0).score(sources, targets)
    monkeypatch.setattr(_compress, "COPY_THRESHOLD", threshold)
    assert np.array_equal(CompressionSelector(num_workers=0).score(sources, targets), expected)


def test_lz4_and_zstd_measure_the_reference_calls():
    lz4_frame = pytest.importorskip("lz4.frame")
    zstandard = pytest.importorskip("zstandard")
    for text in (CODE, LONG_CODE, PROSE + NOISE):
        data, target = text.encode(), PROSE.encode()
        assert pair_sizes(data, [target], "lz4", 0) == (
            len(lz4_frame.compress(data, compression_level=0)), [len(lz4_frame.compress(data + target, compression_level=0))])  # fmt: skip
        zstd = zstandard.ZstdCompressor(level=3)
        assert pair_sizes(data, [target], "zstd", 3) == (len(zstd.compress(data)), [len(zstd.compress(data + target))])


@pytest.mark.parametrize("backend", ["gzip", "zlib"])
def test_deflate_level_0_is_refused(backend):
    # level 0 stores: sizes become length + constant, the official package's silent default
    assert gzip_size(LONG_CODE, 0) > len(LONG_CODE.encode()) > 5 * gzip_size(LONG_CODE, 9)
    with pytest.raises(ValueError, match="level 0 stores the text uncompressed.*level=9"):
        CompressionSelector(backend, 0)


def test_unknown_backend_and_no_targets_are_clear_errors():
    with pytest.raises(ValueError, match="unknown compression backend 'brotli'"):
        CompressionSelector("brotli")
    with pytest.raises(ValueError, match="at least one target"):
        CompressionSelector(num_workers=0).score([CODE], [])


def test_a_text_is_closer_to_itself_than_to_unrelated_text():
    selector = CompressionSelector(num_workers=0)
    for text in (CODE, LONG_CODE, PROSE):
        same, other = selector.score([text, NOISE], [text])
        assert 1 - same < 1 - other  # NCD(x, x) < NCD(x, unrelated)


def test_worker_processes_give_the_single_process_scores(corpus):
    sources, targets = corpus.train_texts, corpus.target_texts[:5]
    alone = CompressionSelector(num_workers=0).score(sources, targets)
    pooled = CompressionSelector(num_workers=2, chunks_per_worker=3).score(sources, targets)
    assert np.array_equal(alone, pooled)


def test_the_process_pool_fallback_gives_the_single_process_scores(corpus, monkeypatch):
    # where fork is not used (macOS, Windows) a process pool takes the chunks
    sources, targets = corpus.train_texts[:40], corpus.target_texts[:4]
    alone = CompressionSelector(num_workers=0).score(sources, targets)
    monkeypatch.setattr(zipfit, "fork_available", lambda: False)
    assert np.array_equal(CompressionSelector(num_workers=2, chunks_per_worker=2).score(sources, targets), alone)


@pytest.mark.skipif(not _forked.fork_available(), reason="the forked scorer runs on Linux only")
def test_forked_map_fills_every_index_once_in_order():
    calls = []

    def chunk(start: int, stop: int) -> np.ndarray:
        calls.append((start, stop))  # the parent's own chunks only (children have their own copy)
        return np.arange(start, stop, dtype=np.float64) ** 2

    values = _forked.forked_map(chunk, 103, processes=3, chunk=7)  # 103 = 14 chunks of 7 and one of 5
    assert np.array_equal(values, np.arange(103, dtype=np.float64) ** 2)
    assert all(stop - start in (7, 5) and start % 7 == 0 for start, stop in calls)


@pytest.mark.skipif(not _forked.fork_available(), reason="the forked scorer runs on Linux only")
def test_a_dead_scoring_process_is_an_error_not_missing_scores(tmp_path):
    parent, claimed = os.getpid(), tmp_path / "child-claimed"

    def chunk(start: int, stop: int) -> np.ndarray:
        if os.getpid() != parent:
            claimed.touch()
            os._exit(3)  # a child dies holding its chunk
        deadline = time.monotonic() + 60
        while not claimed.exists() and time.monotonic() < deadline:  # leave the child a chunk to die with
            time.sleep(0.01)
        return np.zeros(stop - start)

    with pytest.raises(RuntimeError, match="exited with code 3"):
        _forked.forked_map(chunk, 50, processes=2, chunk=1)


def test_ranking_equals_the_official_package(corpus, monkeypatch):
    try:
        import brotli  # noqa: F401
    except ImportError:  # the official module imports brotli without declaring it; gzip never uses it
        monkeypatch.setitem(sys.modules, "brotli", types.ModuleType("brotli"))
    ZIPFIT = pytest.importorskip("zip_fit").ZIPFIT  # the dev extra's official package

    sources, targets = corpus.train_texts, corpus.target_texts
    official = ZIPFIT("unused", "unused", k=len(sources), compression_algorithm="gzip", compress_level=9)
    with contextlib.redirect_stdout(io.StringIO()):
        ranked = official.rank_sequences_by_alignment(sources, targets)
    scores = CompressionSelector("gzip", 9, num_workers=0).score(sources, targets)
    assert len(set(sources)) == len(sources) and len(ranked) == len(sources)
    theirs = {text: score for text, score in ranked}
    # the official mean sums in pool-arrival order: equal up to the last bits
    assert np.allclose(scores, [theirs[text] for text in sources], rtol=0, atol=1e-15)
    # the two rankings agree up to exact ties: each order is non-increasing in the other's scores
    along_theirs = np.array([scores[sources.index(text)] for text, _ in ranked])
    along_ours = np.array([theirs[sources[i]] for i in np.argsort(-scores, kind="stable")])
    assert np.all(np.diff(along_theirs) <= 1e-15) and np.all(np.diff(along_ours) <= 1e-15)
    assert np.ptp(scores) > 0.1  # a real spread, not a degenerate constant


def test_top_k_of_the_stdlib_pool_is_mostly_code(corpus):
    data = CompressionSelected(corpus, k=45, num_workers=0)  # a quarter of the pool, as in the recipe
    data.setup("fit")
    kinds = [corpus.train_kinds[i] for i in data.selected]
    # a random quarter of the 3 x 60 pool holds a third of code; ZIP-FIT keeps mostly code, never noise
    assert kinds.count("code") / len(kinds) >= 0.75 and "random" not in kinds
    assert np.array_equal(data.selected, data.ranking[:45])
    assert data.scores[data.ranking[0]] >= data.scores[data.ranking[-1]]


def test_the_training_loader_yields_exactly_the_selected_examples(corpus):
    for strategy in ("top", "random"):
        data = CompressionSelected(corpus, k=25, strategy=strategy, seed=3, num_workers=0)
        data.setup("fit")
        seen = [text for batch in data.train_dataloader() for text in batch["text"]]
        assert sorted(seen) == sorted(corpus.train_texts[i] for i in data.selected)
        assert len(set(data.selected.tolist())) == 25
    assert data.val_dataloader().dataset.texts == corpus.val_texts


def test_scores_are_cached_on_disk_and_reused_without_recomputing(corpus, tmp_path, monkeypatch):
    first = CompressionSelected(corpus, k=10, num_workers=0, cache_dir=str(tmp_path))
    first.setup("fit")
    assert not first.cache_hit and len(list(tmp_path.glob("zipfit-*.npy"))) == 1

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored again despite the cache")

    monkeypatch.setattr(CompressionSelector, "score", no_scoring)
    second = CompressionSelected(corpus, k=10, num_workers=0, cache_dir=str(tmp_path))
    second.setup("fit")
    assert second.cache_hit and np.array_equal(second.scores, first.scores)
    # another level is another key: it must score (and here hits the patched scorer)
    with pytest.raises(AssertionError, match="scored again"):
        CompressionSelected(corpus, k=10, level=6, num_workers=0, cache_dir=str(tmp_path)).setup("fit")


class _Tensors(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(4, 2)), batch_size=2)


class _Records(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader([{"text": t} for t in (CODE, PROSE, NOISE)], batch_size=2)


def test_wrapped_data_without_text_is_a_clear_error():
    with pytest.raises(ValueError, match="_Tensors has no `train_texts` and its training items have no 'text'"):
        CompressionSelected(_Tensors(), k=1, target=[CODE], num_workers=0).setup("fit")


def test_text_field_of_dict_items_and_target_files(tmp_path):
    target = tmp_path / "target.jsonl"
    target.write_text('{"text": "def add(a, b):\\n    total = a + b\\n    return total\\n"}\n')
    data = CompressionSelected(_Records(), k=1, target=str(target), num_workers=0)
    data.setup("fit")
    assert data.selected.tolist() == [0]  # the code is closest to code
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        CompressionSelected(_Records(), k=1, target=str(tmp_path / "missing.jsonl"), num_workers=0).setup("fit")
    with pytest.raises(ValueError, match="k=4 exceeds the 3 training examples"):
        CompressionSelected(_Records(), k=4, target=[CODE], num_workers=0).setup("fit")


def test_byte_lm_loss_ignores_padding_and_matches_a_hand_computation():
    torch.manual_seed(0)
    model = ByteLM(embed_dim=8, hidden_dim=16)
    tokens = torch.tensor([[104, 105, 33, 256, 256], [1, 2, 3, 4, 5]])
    logits = model(tokens[:, :-1])
    terms = [
        F.cross_entropy(logits[b, t], tokens[b, t + 1]) for b in range(2) for t in range(4) if tokens[b, t + 1] != 256
    ]
    assert len(terms) == 6
    assert torch.allclose(model.loss(tokens), torch.stack(terms).mean(), atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16-mixed: the loss is taken in float32
        low = model.loss(tokens)
    assert low.dtype == torch.float32 and torch.allclose(low, model.loss(tokens), rtol=2e-2)


@pytest.mark.slow
def test_recipe_configs_run_through_the_cli(tmp_path, monkeypatch):
    from lightning_mtl.cli import main

    monkeypatch.chdir(tmp_path)  # runs/ and the score cache land here
    recipe = [str(ROOT / "configs/selection/zipfit.yaml")]
    small = ["--data.init_args.datamodule.init_args.per_kind=40", "--data.init_args.k=30", "--trainer.fast_dev_run=true",
             "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]  # fmt: skip
    # the random baseline also under bf16-mixed, which Lightning allows on the CPU
    for extra, flags in (
        ([], []),
        ([str(ROOT / "configs/selection/zipfit_random.yaml")], ["--trainer.precision=bf16-mixed"]),
    ):
        cli = main(["fit", *(arg for c in recipe + extra for arg in ("--config", c)), *small, *flags])
        assert cli.trainer.state.finished and cli.trainer.global_step == 1
        assert len(cli.datamodule.selected) == 30
    assert cli.datamodule.strategy == "random" and cli.trainer.precision == "bf16-mixed"
    assert list((tmp_path / "runs/zipfit_cache").glob("zipfit-*.npy"))


class _Pool(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.train_texts = [
            f"def f{i}(x):\n    return x + {i}\n" if i % 2 else f"word{i} " * (3 + i) for i in range(12)
        ]

    def train_dataloader(self) -> DataLoader:
        return DataLoader([{"text": t} for t in self.train_texts], batch_size=1, shuffle=True)  # type: ignore[arg-type]


class _Constant(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return (self.w**2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _SeenTexts(pl.Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.seen: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.seen += batch["text"]

    def on_train_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        selected = trainer.datamodule.selected.tolist()
        torch.save({"seen": self.seen, "selected": selected}, self.folder / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_ranks_select_the_same_subset_and_split_it(tmp_path):
    target = ["def g(y):\n    return y * 2\n"]
    reference = CompressionSelected(_Pool(), k=6, target=target, num_workers=0)
    reference.setup("fit")
    trainer = pl.Trainer(accelerator="cpu", strategy=SpawnDDP(), devices=2, max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[_SeenTexts(tmp_path)])  # fmt: skip
    trainer.fit(_Constant(), datamodule=CompressionSelected(_Pool(), k=6, target=target, num_workers=0))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["selected"] == ranks[1]["selected"] == reference.selected.tolist()
    assert {i % 2 for i in reference.selected.tolist()} == {1}  # the code texts
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 3
    kept = {_Pool().train_texts[i] for i in reference.selected}
    assert set(ranks[0]["seen"]).isdisjoint(ranks[1]["seen"]) and set(ranks[0]["seen"]) | set(ranks[1]["seen"]) == kept
