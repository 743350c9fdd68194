"""ZIP-FIT: rank source texts by their compression alignment with a target set and keep the top K.

Obbad, Mlauzi, Miranda, Schaeffer, Obbad, Koyejo, "ZIP-FIT: Embedding-Free Data Selection via
Compression-Based Alignment", 2024.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, Subset

from lightning_mtl.selection._compress import check_backend, keep_heap_mapped, pair_sizes, size_function
from lightning_mtl.selection._forked import fork_available, forked_map

__all__ = ["CompressionSelected", "CompressionSelector", "ncd"]


def ncd(c_x: int, c_y: int, c_xy: int) -> float:
    """Normalised compression distance ``(C(xy) - min(C(x), C(y))) / max(C(x), C(y))``.

    Args:
        c_x: compressed length of ``x``.
        c_y: compressed length of ``y``.
        c_xy: compressed length of the plain concatenation ``x + y`` (source first, no separator).

    Example:
        >>> ncd(10, 20, 25)
        0.75
    """
    return (c_xy - min(c_x, c_y)) / max(c_x, c_y)


# the targets and settings of one worker process, set once by the pool initializer
_WORKER: dict[str, Any] = {}


def _init_worker(targets: list[bytes], target_sizes: list[int], backend: str, level: int) -> None:
    keep_heap_mapped()
    _WORKER.update(targets=targets, target_sizes=np.asarray(target_sizes, dtype=np.int64), backend=backend, level=level)


def _align_chunk(job: tuple[int, list[bytes]]) -> tuple[int, np.ndarray]:
    start, sources = job
    w = _WORKER
    return start, _alignments(sources, w["targets"], w["target_sizes"], w["backend"], w["level"])


def _alignments(sources: Sequence[bytes], targets: list[bytes], target_sizes: np.ndarray, backend: str, level: int) -> np.ndarray:  # fmt: skip
    """``1 - mean_j NCD(source, target_j)`` per source, summed in target order like the reference."""
    out = np.empty(len(sources))
    for i, source in enumerate(sources):
        c_x, pairs = pair_sizes(source, targets, backend, level)
        c_xy = np.asarray(pairs, dtype=np.int64)
        # int64 -> float64 is exact here, so each division rounds like Python's int / int
        distance = (c_xy - np.minimum(c_x, target_sizes)) / np.maximum(c_x, target_sizes)
        out[i] = np.mean(1.0 - distance)
    return out


class CompressionSelector:
    """ZIP-FIT's scorer: alignment ``1 - mean_j NCD(x, t_j)`` of each source text ``x`` with target texts ``t_j``.

    Obbad et al., "ZIP-FIT: Embedding-Free Data Selection via Compression-Based Alignment", 2024. The
    distance is the paper's NCD over plain concatenation (source first), sizes measured exactly as the
    official ``zip-fit`` package measures them for the same compressor and level, so the scores agree.

    Args:
        backend: ``"gzip"`` (the paper's), ``"zlib"``, ``"lz4"`` or ``"zstd"`` (the last two need the
            ``selection`` extra).
        level: compression level; gzip/zlib need 1..9 (level 0 stores, compressing nothing).
        num_workers: processes over sources, this one included (``None``: every CPU; ``0`` or ``1``: this
            process only). On Linux the others are forked and every process, this one too, claims chunks of
            sources from a shared counter; elsewhere a process pool takes the chunks.
        chunks_per_worker: source chunks per process (load balance against per-chunk overhead).

    Example:
        >>> selector = CompressionSelector(num_workers=0)
        >>> code = "def add(a, b):\\n    return a + b\\n"
        >>> scores = selector.score([code, "the quick brown fox jumps"], [code])
        >>> bool(scores[0] > scores[1])
        True
    """

    def __init__(self, backend: str = "gzip", level: int = 9, num_workers: int | None = None,
                 chunks_per_worker: int = 8) -> None:  # fmt: skip
        check_backend(backend, level)
        self.backend, self.level = backend, level
        self.num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
        self.chunks_per_worker = chunks_per_worker
        self._sizes: dict[bytes, int] = {}  # compressed size of each text seen, reused across calls

    def size(self, text: str | bytes) -> int:
        """Compressed length of one text (cached)."""
        data = text.encode("utf-8") if isinstance(text, str) else text
        if data not in self._sizes:
            self._sizes[data] = size_function(self.backend, self.level)(data)
        return self._sizes[data]

    def score(self, sources: Sequence[str], targets: Sequence[str]) -> np.ndarray:
        """Alignment of every source with the target set, shape ``(len(sources),)``, higher = closer.

        Raises:
            ValueError: no targets.
        """
        if not targets:
            raise ValueError("ZIP-FIT needs at least one target text")
        target_bytes = [t.encode("utf-8") for t in targets]
        target_sizes = [self.size(t) for t in target_bytes]
        source_bytes = [s.encode("utf-8") for s in sources]
        sizes = np.asarray(target_sizes, dtype=np.int64)
        if self.num_workers <= 1 or len(source_bytes) < 2:
            return _alignments(source_bytes, target_bytes, sizes, self.backend, self.level)
        processes = min(self.num_workers, len(source_bytes))
        chunk = -(-len(source_bytes) // (processes * self.chunks_per_worker))
        if fork_available():

            def chunk_scores(start: int, stop: int) -> np.ndarray:
                return _alignments(source_bytes[start:stop], target_bytes, sizes, self.backend, self.level)

            return forked_map(chunk_scores, len(source_bytes), processes, chunk)
        jobs = [(start, source_bytes[start : start + chunk]) for start in range(0, len(source_bytes), chunk)]
        out = np.empty(len(source_bytes))
        init = (target_bytes, target_sizes, self.backend, self.level)
        with multiprocessing.get_context().Pool(processes, _init_worker, init) as pool:
            for start, values in pool.imap_unordered(_align_chunk, jobs):
                out[start : start + len(values)] = values
        return out

    def rank(self, sources: Sequence[str], targets: Sequence[str]) -> np.ndarray:
        """Source indices from most to least aligned (ties keep the source order)."""
        return np.argsort(-self.score(sources, targets), kind="stable")


def _content_key(sources: Sequence[str], targets: Sequence[str], backend: str, level: int) -> str:
    digest = hashlib.sha256(f"zipfit-v1|{backend}|{level}".encode())
    for group in (sources, targets):
        digest.update(b"|%d|" % len(group))
        for text in group:
            data = text.encode("utf-8")
            digest.update(b"%d:" % len(data) + data)  # length-prefixed: no two lists hash alike by regrouping
    return digest.hexdigest()


def _read_texts(path: str, field: str) -> list[str]:
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"target file {path!r} does not exist; give a .jsonl (one object per line) or .txt file"
        )
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line)[field] for line in f if line.strip()]
        return [line.rstrip("\n") for line in f if line.strip()]


class CompressionSelected(pl.LightningDataModule):
    """Wraps a data module and trains on the K source examples most aligned with a target set (ZIP-FIT).

    Obbad et al., "ZIP-FIT: Embedding-Free Data Selection via Compression-Based Alignment", 2024. At
    ``setup`` the wrapped module's training texts are scored with :class:`CompressionSelector` and the
    training loader keeps the top ``k`` (``strategy="random"``: ``k`` uniformly drawn ones, the baseline);
    validation, test and predict loaders are the wrapped module's. Scores are cached on disk under
    ``cache_dir`` keyed by a hash of the sources, targets, backend and level. Every DDP rank scores (or
    reads) the same data, so every rank selects the same subset.

    The training texts are the wrapped module's ``train_texts`` (a list of strings aligned with its training
    data set) or, failing that, the ``text_field`` entry of each item of its training data set.

    Args:
        datamodule: the wrapped data module.
        k: how many training examples to keep.
        target: the target texts: a list of strings, a ``.jsonl`` file (``text_field`` of each line) or a
            ``.txt`` file (one per line); ``None`` takes the wrapped module's ``target_texts``.
        backend: compressor (see :class:`CompressionSelector`).
        level: compression level.
        strategy: ``"top"`` (ZIP-FIT) or ``"random"`` (a seeded random ``k``, the baseline).
        seed: seed of the random baseline.
        num_workers: scoring processes (``None``: every CPU).
        cache_dir: folder for the score cache (``None``: no disk cache).
        text_field: the text key of dict items when the module has no ``train_texts``.
    """

    def __init__(self, datamodule: pl.LightningDataModule, k: int, target: list[str] | str | None = None,
                 backend: str = "gzip", level: int = 9, strategy: str = "top", seed: int = 0,
                 num_workers: int | None = None, cache_dir: str | None = None, text_field: str = "text") -> None:  # fmt: skip
        super().__init__()
        if strategy not in ("top", "random"):
            raise ValueError(f"strategy must be 'top' or 'random', got {strategy!r}")
        if k < 1:
            raise ValueError(f"k must be a positive number of examples, got {k}")
        self.datamodule, self.k, self.target, self.strategy, self.seed = datamodule, k, target, strategy, seed
        self.selector = CompressionSelector(backend, level, num_workers)
        self.cache_dir, self.text_field = cache_dir, text_field
        self.scores: np.ndarray | None = None
        self.ranking: np.ndarray | None = None  # training indices, most aligned first
        self.selected: np.ndarray | None = None  # the kept training indices
        self.cache_hit = False

    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str) -> None:
        self.datamodule.setup(stage)
        if stage != "fit" or self.selected is not None:
            return
        sources = self.train_texts()
        if self.k > len(sources):
            raise ValueError(f"k={self.k} exceeds the {len(sources)} training examples of the wrapped data module")
        self.scores = self._scores(sources, self.target_texts())
        self.ranking = np.argsort(-self.scores, kind="stable")
        if self.strategy == "top":
            self.selected = self.ranking[: self.k]
        else:
            self.selected = np.random.default_rng(self.seed).choice(len(sources), self.k, replace=False)

    def train_texts(self) -> list[str]:
        """The wrapped module's training texts, in training-set order."""
        texts = getattr(self.datamodule, "train_texts", None)
        if texts is None:
            dataset = self.datamodule.train_dataloader().dataset
            items = [dataset[i] for i in range(len(dataset))]
            if not all(isinstance(item, Mapping) and isinstance(item.get(self.text_field), str) for item in items):
                raise ValueError(
                    f"{type(self.datamodule).__name__} has no `train_texts` and its training items have no "
                    f"{self.text_field!r} text field; CompressionSelected needs texts to score"
                )
            texts = [item[self.text_field] for item in items]
        return list(texts)

    def target_texts(self) -> list[str]:
        """The target set's texts."""
        if isinstance(self.target, str):
            return _read_texts(self.target, self.text_field)
        if self.target is not None:
            return list(self.target)
        texts = getattr(self.datamodule, "target_texts", None)
        if texts is None:
            raise ValueError(f"no target given and {type(self.datamodule).__name__} has no `target_texts`")
        return list(texts)

    def _scores(self, sources: list[str], targets: list[str]) -> np.ndarray:
        path = None
        if self.cache_dir is not None:
            key = _content_key(sources, targets, self.selector.backend, self.selector.level)
            path = os.path.join(self.cache_dir, f"zipfit-{key}.npy")
            if os.path.exists(path):
                self.cache_hit = True
                return np.load(path)
        scores = self.selector.score(sources, targets)
        if path is not None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            partial = f"{path}.{os.getpid()}.tmp"
            with open(partial, "wb") as f:
                np.save(f, scores)
            os.replace(partial, path)  # atomic: ranks writing the same key never leave a torn file
        return scores

    def train_dataloader(self) -> DataLoader:
        if self.selected is None:
            raise RuntimeError("CompressionSelected.train_dataloader() before setup('fit')")
        loader = self.datamodule.train_dataloader()
        subset = Subset(loader.dataset, self.selected.tolist())
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(subset, batch_size=loader.batch_size, shuffle=isinstance(loader.sampler, RandomSampler),
                          collate_fn=loader.collate_fn, num_workers=loader.num_workers, drop_last=loader.drop_last,
                          generator=generator)  # fmt: skip

    def val_dataloader(self) -> Any:
        return self.datamodule.val_dataloader()

    def test_dataloader(self) -> Any:
        return self.datamodule.test_dataloader()

    def predict_dataloader(self) -> Any:
        return self.datamodule.predict_dataloader()
