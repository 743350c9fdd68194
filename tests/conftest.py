import os

import pytest
import torch

# Tests never reach the network; W&B runs are offline.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")

# pytest-xdist runs one worker per core: one thread each avoids oversubscribing the machine
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    """Every test runs in its own folder so logs and checkpoints never mix."""
    monkeypatch.chdir(tmp_path)
    yield
