"""ZIP-FIT scoring throughput: ``CompressionSelector.score`` against the official ``zip-fit`` package.

Same sources, same targets, gzip level 9 (the paper's), both sides on every core (the official code opens
``Pool(cpu_count())``; ours ``num_workers=os.cpu_count()``), same process, sides alternating for
``--repeats`` rounds; a side's figure is the median round. Pairs per second = sources x targets / wall
time of a full scoring (process start-up included on both sides). Each side's CPU seconds (the process and
its joined worker processes) are printed too: on a machine shared with other jobs the wall-clock ratio also
depends on how many runnable processes each side has (the official code keeps its feeding process busy
beside its workers), while the CPU ratio measures the work each side does. The scores must be identical (asserted:
the same integer sizes give the same floats) and so must the ranking.

Three workloads, all against the docs recipe's 30 target functions (200-1500 characters): source
documents of 16 KB and of 4 KB (consecutive chunks of stdlib modules: the paper's shape, long source
documents against short target examples) and the recipe's own pool (functions, docstrings and random
text of 200-1500 characters). The saving is the source's compression, done once per source instead of
once per pair, so it grows with the source's length; on short texts the gain is the per-pair overhead (one
forked process per core, the calling one included, nothing pickled). The >= 3x target is checked on every
workload; the closing JSON line also gives the 1-minute load average, since other jobs on the machine
slow both sides.

    python benchmarks/selection.py            # full run
    python benchmarks/selection.py --quick    # under a minute on a 2-core CPU
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import resource
import sys
import time
import types

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _timing import emit, median

from lightning_mtl.selection import CompressionSelector, StdlibCorpus
from lightning_mtl.selection._compress import pair_sizes
from lightning_mtl.selection.stdlib_corpus import POOL_MODULES


def official_class() -> type:
    """The official ZIPFIT class. It imports ``brotli`` at module level without declaring it; the gzip path
    never touches it, so a placeholder module stands in where brotli is not installed."""
    try:
        import brotli  # noqa: F401
    except ImportError:
        sys.modules["brotli"] = types.ModuleType("brotli")
    from zip_fit import ZIPFIT

    return ZIPFIT


def documents(size: int, count: int) -> list[str]:
    """``count`` consecutive ``size``-character chunks of the pool modules' source files."""
    chunks: list[str] = []
    for name in POOL_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        with open(spec.origin, encoding="utf-8") as f:
            text = f.read()
        chunks += [text[i : i + size] for i in range(0, len(text) - size + 1, size)]
    return chunks[:count]


def same_sizes(sources: list[str], targets: list[str], pairs: int = 40) -> None:
    """Our compressed sizes of single texts and of concatenations equal the official ``compress`` exactly."""
    zipfit = official_class()("unused", "unused", k=1, compression_algorithm="gzip", compress_level=9)
    rng = np.random.default_rng(0)
    for i, j in zip(rng.integers(len(sources), size=pairs), rng.integers(len(targets), size=pairs)):
        alone, together = pair_sizes(sources[i].encode(), [targets[j].encode()], "gzip", 9)
        assert alone == zipfit.compress(sources[i]) and together == [zipfit.compress(sources[i] + targets[j])]


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (both sides' worker processes are joined)."""
    mine, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return mine.ru_utime + mine.ru_stime + children.ru_utime + children.ru_stime


def official_scores(sources: list[str], targets: list[str]) -> tuple[float, float, dict[str, float]]:
    zipfit = official_class()("unused", "unused", k=len(sources), compression_algorithm="gzip", compress_level=9)
    start, cpu = time.perf_counter(), cpu_seconds()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints progress
        ranked = zipfit.rank_sequences_by_alignment(sources, targets)
    return time.perf_counter() - start, cpu_seconds() - cpu, {text: float(score) for text, score in ranked}


def our_scores(sources: list[str], targets: list[str]) -> tuple[float, float, np.ndarray]:
    selector = CompressionSelector("gzip", 9, num_workers=os.cpu_count())
    start, cpu = time.perf_counter(), cpu_seconds()
    scores = selector.score(sources, targets)
    return time.perf_counter() - start, cpu_seconds() - cpu, scores


def compare(name: str, sources: list[str], targets: list[str], repeats: int) -> dict:
    assert len(set(sources)) == len(sources), "the official code keys results by text: sources must be unique"
    ours, theirs, our_cpu, their_cpu, worst = [], [], [], [], 0.0
    for _ in range(repeats):
        seconds, cpu, scores = our_scores(sources, targets)
        ours.append(seconds)
        our_cpu.append(cpu)
        seconds, cpu, reference = official_scores(sources, targets)
        theirs.append(seconds)
        their_cpu.append(cpu)
        difference = max(abs(reference[text] - value) for text, value in zip(sources, scores))
        # the official code averages each source's similarities in the order its pool returns them, so the
        # floats may differ in the last bits; the compressed sizes themselves are compared exactly below
        assert difference <= 1e-15, f"{name}: scores differ from the official package by {difference}"
        along_ours = [reference[sources[i]] for i in np.argsort(-scores, kind="stable")]
        assert all(a >= b - 1e-15 for a, b in zip(along_ours, along_ours[1:])), f"{name}: rankings differ"
        worst = max(worst, difference)
    same_sizes(sources, targets)
    pairs = len(sources) * len(targets)
    row = {
        "sources": len(sources), "targets": len(targets),
        "mean_source_chars": round(float(np.mean([len(s) for s in sources]))),
        "mean_target_chars": round(float(np.mean([len(t) for t in targets]))),
        "ours_pairs_per_s": round(pairs / median(ours)), "official_pairs_per_s": round(pairs / median(theirs)),
        "speedup": round(median(theirs) / median(ours), 2), "max_abs_score_difference": worst,
        "ours_cpu_s": round(median(our_cpu), 3), "official_cpu_s": round(median(their_cpu), 3),
        "cpu_ratio": round(median(their_cpu) / median(our_cpu), 2),
    }  # fmt: skip
    print(f"{name:9s} {row['sources']:5d} x {row['targets']:3d}  ours {row['ours_pairs_per_s']:8d} pairs/s  "
          f"official {row['official_pairs_per_s']:8d} pairs/s  speedup x{row['speedup']:.2f}  "
          f"CPU s {row['ours_cpu_s']:.2f} vs {row['official_cpu_s']:.2f} (x{row['cpu_ratio']:.2f})  "
          f"(sizes identical, scores within {worst:.0e})")  # fmt: skip
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sources and rounds (under a minute)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    corpus = StdlibCorpus(per_kind=80 if args.quick else 200)
    corpus.setup("fit")
    targets = corpus.target_texts
    print(f"{os.cpu_count()} CPU(s); gzip level 9; median of {repeats} round(s)")
    docs = 40 if args.quick else 200
    rows = {
        "documents_16k": compare("docs 16K", documents(16384, docs), targets, repeats),
        "documents_4k": compare("docs 4K", documents(4096, 2 * docs), targets, repeats),
        "recipe": compare("recipe", corpus.train_texts, targets, repeats),
    }
    labels = {"documents_16k": "16 KB documents", "documents_4k": "4 KB documents", "recipe": "~620-char texts"}
    targets = {f"{label}: speedup >= 3x with identical scores": "met" if rows[key]["speedup"] >= 3.0 else "missed"
               for key, label in labels.items()}  # fmt: skip
    emit({"benchmark": "selection", "quick": args.quick, "cpus": os.cpu_count(), "load_average": os.getloadavg()[0],
          "workloads": rows, "targets": targets})  # fmt: skip


if __name__ == "__main__":
    main()
