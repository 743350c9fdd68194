"""Merging benchmarks: our streaming TIES against a faithful re-implementation of the official T x P algorithm.

TIES row: ``T`` task vectors shaped like a ResNet-18 (torchvision's, 11.7 M floating entries incl. the
BatchNorm statistics), random normal entries from fixed seeds, k = 20 %, model-wide top-k as the
official code. Each side runs in a child process of its own (the same vectors rebuilt from the same
seeds): its peak extra resident memory is the peak resident set (``VmHWM``) during the merges minus the
resident set once the vectors are built, and its time the median over ``--repeats`` merges. Both sides are first run on a
small model in this process and must agree. Targets: ours <= 0.5x the official peak extra memory and
<= 1.0x its time; the closing JSON line says "met" or "missed" for each.

Storage row: the cost of keeping a task vector in float16 (the official aTLAS code does) on the
quickstart model: relative error of the vector and the validation accuracy of theta_0 + tau either way.

Further rows (aTLAS, grafting) add a function to ``ROWS``: it takes the parsed arguments and returns
``(figures, targets)``; the closing line gathers every row.

    python benchmarks/merging.py            # T = 8 ResNet-18 task vectors
    python benchmarks/merging.py --quick    # T = 8, every tensor a quarter of its size: under a minute on a 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# the merges need torch only: the children start without Lightning (the shared _timing helpers import it)
from lightning_mtl.merging import TIES  # noqa: E402
from tests.merging.official_ties import official_ties  # noqa: E402


def resnet18_shapes() -> dict[str, tuple[int, ...]]:
    """Floating-point entries of torchvision's ResNet-18 state dict, by name."""
    import torchvision

    with torch.device("meta"):  # shapes only: no memory touched before the measurement
        state = torchvision.models.resnet18(weights=None).state_dict()
    return {key: tuple(value.shape) for key, value in state.items() if value.is_floating_point()}


def task_vectors(shapes: dict[str, tuple[int, ...]], num: int, scale: float = 1.0) -> list[dict[str, torch.Tensor]]:
    """``num`` random task vectors over ``shapes`` (sizes scaled by ``scale`` on the first axis), written in place."""
    vectors = []
    for t in range(num):
        generator = torch.Generator().manual_seed(t)
        vector = {}
        for key, shape in shapes.items():
            sized = (max(1, int(shape[0] * scale)), *shape[1:]) if shape else shape
            vector[key] = torch.empty(sized).normal_(generator=generator)
        vectors.append(vector)
    return vectors


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss_bytes() -> int:
    """This process's peak resident set. ``VmHWM`` belongs to this address space; ``ru_maxrss`` starts from
    the parent's resident set at fork on Linux, so a child's own peak hides under a large parent's."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _no_huge_pages() -> None:
    """Turn transparent huge pages off for this process (Linux): with them the kernel backs memory in 2 MB
    pages whenever it gets round to it, and the resident set of the same run varies by hundreds of MB."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE
    except (OSError, AttributeError):
        pass


def _rss_now_bytes() -> int:
    """The resident set now, after handing freed heap pages back (glibc), with the peak reset to it where
    Linux allows (``/proc/self/clear_refs``); the peak so far elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
    except (OSError, AttributeError):
        pass
    now_rss = _status_bytes("VmRSS")
    return now_rss if now_rss is not None else _peak_rss_bytes()


def child(side: str, num: int, k: float, repeats: int, scale: float) -> None:
    """Run one side on the benchmark's vectors in this (fresh) process and print its figures as JSON."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    _no_huge_pages()
    shapes = {key: tuple(shape) for key, shape in json.loads(sys.stdin.read()).items()}  # from the parent
    run = (lambda v: TIES(k=k)(v)) if side == "ours" else (lambda v: official_ties(v, k)[0])
    run(task_vectors(shapes, num, scale / 64))  # warm-up: code pages and kernels load outside the measurement
    vectors = task_vectors(shapes, num, scale)
    # extra = the peak after the merges minus the resident set before them (an earlier, higher peak would only
    # count against the side measured, never hide its memory)
    before = _rss_now_bytes()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()  # CPU tensors: nothing to synchronize
        merged = run(vectors)
        times.append(time.perf_counter() - start)
        del merged
    entries = sum(v.numel() for v in vectors[0].values())
    print(json.dumps({"side": side, "seconds": statistics.median(times), "peak_extra_mb": (_peak_rss_bytes() - before) / 2**20,
                      "vectors_mb": num * entries * 4 / 2**20, "entries": entries}))  # fmt: skip


def _run_child(side: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), "--child", side, "--tasks", str(args.tasks),
               "--k", str(args.k), "--repeats", str(args.repeats), "--scale", str(args.scale)]  # fmt: skip
    # the shapes travel on stdin: the child imports neither torchvision nor Lightning
    done = subprocess.run(
        command, input=json.dumps(resnet18_shapes()), capture_output=True, text=True, check=True, cwd=ROOT
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def ties_row(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    # agreement first, on a small copy of the shapes (the tests check it more thoroughly)
    small = task_vectors(resnet18_shapes(), args.tasks, scale=args.scale / 16)
    ours, (reference, _) = TIES(k=args.k)(small), official_ties(small, args.k)
    agree = all(torch.allclose(ours[key], reference[key], atol=1e-6) for key in reference)
    sides = {side: _run_child(side, args) for side in ("official", "ours")}
    time_ratio = sides["ours"]["seconds"] / sides["official"]["seconds"]
    memory_ratio = sides["ours"]["peak_extra_mb"] / max(sides["official"]["peak_extra_mb"], 1e-9)
    print(f"TIES, T={args.tasks} task vectors of {sides['ours']['entries'] / 1e6:.1f} M entries "
          f"({sides['ours']['vectors_mb']:.0f} MB in float32), k={args.k:g} %, model scope; agree: {agree}")  # fmt: skip
    for side, figures in sides.items():
        print(f"  {side:9s} {figures['seconds']:7.3f} s   peak extra memory {figures['peak_extra_mb']:7.0f} MB")
    print(f"  ratio ours/official: time {time_ratio:.2f}x, peak extra memory {memory_ratio:.2f}x")
    figures = {"ties_agree": agree, "ties_time_ratio": round(time_ratio, 3), "ties_memory_ratio": round(memory_ratio, 3),
               "ties_seconds": {s: round(f["seconds"], 4) for s, f in sides.items()},
               "ties_peak_extra_mb": {s: round(f["peak_extra_mb"], 1) for s, f in sides.items()}}  # fmt: skip
    targets = {"ties_memory_ratio<=0.5": "met" if memory_ratio <= 0.5 else "missed",
               "ties_time_ratio<=1.0": "met" if time_ratio <= 1.0 else "missed",
               "ties_agree": "met" if agree else "missed"}  # fmt: skip
    return figures, targets


def storage_row(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """What float16 storage of a task vector costs: the quickstart model (small CNN, two heads on MultiDigits)
    trained ``--pretrain_steps`` steps is theta_0, trained further ``--finetune_steps`` steps the expert; the
    expert rebuilt as theta_0 + tau from a float32 and from a float16 tau is validated on the same data."""
    import lightning.pytorch as pl

    from lightning_mtl import ClassificationTask, DigitsCNN, MultiDigits, MultiTaskModule
    from lightning_mtl.merging import TaskVector

    pl.seed_everything(0, verbose=False)
    data = MultiDigits(batch_size=256, seed=0)
    module = MultiTaskModule(encoder=DigitsCNN(in_channels=1, out_features=128),
                             tasks={"left": ClassificationTask(10), "right": ClassificationTask(10)})  # fmt: skip
    quiet = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    pl.Trainer(max_steps=args.pretrain_steps, limit_val_batches=0, **quiet).fit(module, datamodule=data)
    base = {key: value.clone() for key, value in module.state_dict().items()}
    pl.Trainer(max_steps=args.finetune_steps, limit_val_batches=0, **quiet).fit(module, datamodule=data)
    tau = TaskVector.from_state_dicts(base, module.state_dict())
    half = tau.to(torch.float16)
    validator = pl.Trainer(**quiet)
    accuracy = {}
    for name, vector in (("float32", tau), ("float16", half)):
        module.load_state_dict(vector.apply_to(base, 1.0))
        accuracy[name] = validator.validate(module, datamodule=data, verbose=False)[0]["val/mean/acc"]
    error = (tau - half).norm() / tau.norm()  # the right side is read in the left one's float32
    flat = torch.cat([value.reshape(-1) for value in tau.values()])
    flushed = float(((flat != 0) & (flat.abs() < 2.0**-14)).float().mean())  # below float16's normal range
    print(f"float16 task vector storage: relative error {error:.2e}, {100 * flushed:.2f} % of entries subnormal "
          f"or flushed, val/mean/acc {accuracy['float32']:.4f} (float32) vs {accuracy['float16']:.4f} (float16)")  # fmt: skip
    figures = {"fp16_relative_error": float(f"{error:.3e}"), "fp16_subnormal_fraction": round(flushed, 5),
               "fp16_acc": round(accuracy["float16"], 4), "fp32_acc": round(accuracy["float32"], 4)}  # fmt: skip
    return figures, {}


# one function per benchmark row; aTLAS and grafting rows are added here
ROWS: dict[str, Callable[[argparse.Namespace], tuple[dict[str, Any], dict[str, str]]]] = {
    "ties": ties_row,
    "storage": storage_row,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="quarter-size tensors, one repeat (under a minute on a 2-core CPU)"
    )
    parser.add_argument("--tasks", type=int, default=8, help="number of task vectors T")
    parser.add_argument("--k", type=float, default=20.0, help="TIES: percentage of entries kept")
    parser.add_argument("--repeats", type=int, default=3, help="merges timed per side (the median is reported)")
    parser.add_argument("--scale", type=float, default=1.0, help="ResNet-18 shapes with their first axis scaled so")
    parser.add_argument("--pretrain_steps", type=int, default=60, help="storage row: steps to theta_0")
    parser.add_argument("--finetune_steps", type=int, default=120, help="storage row: further steps to the expert")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="which rows to run")
    parser.add_argument("--child", choices=["ours", "official"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.tasks, args.k, args.repeats, args.scale)
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _timing import emit

    if args.quick:
        args.tasks, args.repeats, args.scale = 8, 1, 0.25
        args.pretrain_steps, args.finetune_steps = 20, 20
    figures: dict[str, Any] = {
        "benchmark": "merging",
        "device": "cpu",
        "tasks": args.tasks,
        "scale": args.scale,
        "quick": args.quick,
    }
    targets: dict[str, str] = {}
    for name in args.rows:
        row_figures, row_targets = ROWS[name](args)
        figures.update(row_figures)
        targets.update(row_targets)
    emit({**figures, "targets": targets})


if __name__ == "__main__":
    main()
