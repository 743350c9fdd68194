"""examples/pretrain_tiny_vit.py writes weights that the digits recipes' backbone loads exactly."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import torch

from lightning_mtl.continual.prompts import create_vit
from tests.fixtures.trainers import one_thread  # noqa: F401

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "pretrain_tiny_vit.py"


def test_pretrained_tiny_vit_loads_into_the_recipes_backbone(tmp_path, monkeypatch, capsys):
    out = tmp_path / "tiny.pth"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--epochs", "2", "--out", str(out)])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    assert "linear probe of the frozen features" in capsys.readouterr().out
    saved = torch.load(out, map_location="cpu")
    # the recipes' vit_kwargs (configs/continual/data/digits.yaml) and a local file: the weights load as saved
    vit = create_vit("vit_tiny_patch16_224", checkpoint_path=str(out), img_size=16, patch_size=4, depth=5)
    loaded = vit.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    fresh = create_vit("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=5).state_dict()
    assert not torch.equal(fresh["blocks.0.attn.qkv.weight"], loaded["blocks.0.attn.qkv.weight"])
