"""lightning_mtl._distributed: every collective is a no-op in one process, and across two gloo processes
the strided gather restores the data order, the mean and broadcast agree, and ranks are told apart."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_mtl._distributed import (
    broadcast_,
    distributed_rank,
    distributed_world_size,
    gather_rows,
    gather_strided,
    max_over_ranks,
    mean_over_ranks_,
    sum_over_ranks,
)


def test_outside_a_process_group_every_collective_leaves_its_input():
    x = torch.arange(6.0).reshape(3, 2)
    assert distributed_world_size() == 1 and distributed_rank() == 0
    for collective in (gather_rows, sum_over_ranks, max_over_ranks, mean_over_ranks_):
        assert collective(x) is x
    assert gather_strided(x, 3) is x
    broadcast_([x])
    assert torch.equal(x, torch.arange(6.0).reshape(3, 2))


def _worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        data = torch.arange(10.0).reshape(5, 2)  # 5 rows: rank 0 holds rows 0, 2, 4 and rank 1 rows 1, 3
        labels = torch.arange(5)
        single = data[:1]  # 1 row: rank 1's share is empty and does not know the width
        share = single[rank::world] if rank == 0 else torch.zeros(0, 0)
        mean = torch.tensor([float(rank), 10.0 * rank])
        teacher = torch.full((3,), float(rank + 1))
        broadcast_([teacher], src=1)
        results = {
            "rank": distributed_rank(),
            "world": distributed_world_size(),
            "strided": gather_strided(data[rank::world], 5),
            "strided_labels": gather_strided(labels[rank::world], 5),
            "strided_empty": gather_strided(share, 1),
            "rows": gather_rows(data[: rank + 1]),
            "mean": mean_over_ranks_(mean),
            "mean_in_place": mean,
            "teacher": teacher,
        }
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_gather_in_data_order_and_agree(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    data = torch.arange(10.0).reshape(5, 2)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert (got["rank"], got["world"]) == (rank, 2)
        assert torch.equal(got["strided"], data)
        assert torch.equal(got["strided_labels"], torch.arange(5))
        assert torch.equal(got["strided_empty"], data[:1])
        assert torch.equal(got["rows"], torch.cat([data[:1], data[:2]]))  # rank order, unequal shares
        assert torch.equal(got["mean"], torch.tensor([0.5, 5.0]))
        assert got["mean_in_place"] is not None and torch.equal(got["mean_in_place"], torch.tensor([0.5, 5.0]))
        assert torch.equal(got["teacher"], torch.full((3,), 2.0))  # rank 1's values everywhere
