"""Small builders shared by the tests."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_mtl import ClassificationTask, DigitsCNN, MultiDigits, MultiTaskModule


def tiny_multidigits(**kwargs) -> MultiDigits:
    defaults = dict(num_train=256, num_val=64, num_test=64, batch_size=32, seed=0)
    defaults.update(kwargs)
    return MultiDigits(**defaults)


def tiny_module(**kwargs) -> MultiTaskModule:
    defaults = dict(
        encoder=DigitsCNN(channels=(8, 16), out_features=32),
        tasks={"left": ClassificationTask(10), "right": ClassificationTask(10)},
    )
    defaults.update(kwargs)
    return MultiTaskModule(**defaults)


def tiny_trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a test module to run it on one torch thread: tiny problems gain nothing from a second
    thread and lose much to it on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def badly_scaled_jacobians(m: int, seed: int, n: int = 20) -> dict[str, torch.Tensor]:
    """Float32 Jacobians ``[m, n]`` (``m <= n``, full rank) on which aggregators have gone wrong:

    * ``"spread"``: random directions, row norms spread log-evenly over 1e-3..1e3 (shuffled);
    * ``"tiny"``: tasks of norm about 1 with two of them conflicting, and a last task 1e4..1e7
      times smaller (drawn log-uniformly) that conflicts with the first, as when one task has
      nearly converged;
    * ``"conflicting"``: unit-scale tasks where every odd row mostly opposes the row before it.
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    base = rand(m, n)
    unit = base / base.norm(dim=1, keepdim=True)
    norms = torch.logspace(-3, 3, m, dtype=torch.float64)[torch.randperm(m, generator=gen)]
    tiny = rand(m, n) / n**0.5
    if m > 2:
        tiny[1] = -0.7 * tiny[0] + 0.3 * tiny[1]
    ratio = 10 ** (4 + 3 * torch.rand((), generator=gen, dtype=torch.float64))
    tiny[-1] = -(tiny[0] + 0.5 * rand(n) / n**0.5) / ratio
    conflicting = rand(m, n) / n**0.5
    conflicting[1::2] = -0.9 * conflicting[0:-1:2][: m // 2] + 0.2 * conflicting[1::2]
    return {"spread": (unit * norms[:, None]).float(), "tiny": tiny.float(), "conflicting": conflicting.float()}
