"""Multi-task architectures: forward and backward with mixed tasks, which parameters are shared, reference values."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_mtl import MultiTaskModule
from lightning_mtl.architectures.cross_stitch import CrossStitch
from lightning_mtl.architectures.hps import HardParameterSharing
from lightning_mtl.architectures.mmoe import MMoE
from lightning_mtl.architectures.mtan import MTAN
from lightning_mtl.architectures.ple import CGC, PLE
from lightning_mtl.architectures.resnet_dilated import DeepLabHead, ResNetDilated
from lightning_mtl.architectures.segnet import SegNet
from lightning_mtl.architectures.transformers_encoder import TransformersEncoder, pool
from lightning_mtl.datamodules._common import TensorMultiTaskDataset
from lightning_mtl.multitask.dense import DepthTask, SegmentationTask, SurfaceNormalTask
from lightning_mtl.multitask.tasks import ClassificationTask, MultiLabelTask, RegressionTask
from tests.fixtures.trainers import one_thread, tiny_trainer  # noqa: F401 (one_thread: autouse fixture)


def _mlp(d_in: int = 12, d_out: int = 6) -> nn.Module:
    net = nn.Sequential(nn.Flatten(), nn.Linear(d_in, d_out), nn.Tanh())
    net.out_features = d_out
    return net


def _vector_tasks():
    return {"a": ClassificationTask(3), "b": RegressionTask(2), "c": MultiLabelTask(2)}


def _vector_targets(n: int):
    return {"a": torch.randint(0, 3, (n,)), "b": torch.randn(n, 2), "c": torch.randint(0, 2, (n, 2))}


def _dense_tasks():
    return {"seg": SegmentationTask(4), "depth": DepthTask(), "normal": SurfaceNormalTask()}


def _dense_targets(n: int, h: int = 10, w: int = 12):
    normal = torch.nn.functional.normalize(torch.randn(n, 3, h, w), dim=1)
    return {"seg": torch.randint(-1, 4, (n, h, w)), "depth": torch.rand(n, 1, h, w) + 0.5, "normal": normal}


def _stitch_backbone():
    return nn.Sequential(
        nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Tanh()), nn.Sequential(nn.Linear(6, 6), nn.Tanh())
    )


ARCHITECTURES = {
    "hps": lambda: (HardParameterSharing(_mlp()), "vector"),
    "mmoe": lambda: (MMoE(_mlp(), num_experts=3, in_features=12), "vector"),
    "cgc": lambda: (CGC(_mlp(), in_features=12, num_specific=2, num_shared=1), "vector"),
    "ple": lambda: (PLE(_mlp(), in_features=12, tasks=["a", "b", "c"], num_levels=3, num_shared=2), "vector"),
    "cross_stitch": lambda: (CrossStitch(_stitch_backbone(), tasks=["a", "b", "c"], out_features=6), "vector"),
    "hps_segnet": lambda: (HardParameterSharing(SegNet(channels=(4, 6, 8), convs=(1, 2, 2))), "dense"),
    "mtan": lambda: (MTAN(SegNet(channels=(4, 6, 8), convs=(1, 2, 2))), "dense"),
}


def _build(name: str, aggregator: str = "ls"):
    torch.manual_seed(0)
    arch, kind = ARCHITECTURES[name]()
    tasks = _vector_tasks() if kind == "vector" else _dense_tasks()
    model = MultiTaskModule(arch, tasks, aggregator=aggregator)
    x = torch.randn(4, 3, 2, 2) if kind == "vector" else torch.randn(2, 3, 10, 12)
    targets = _vector_targets(4) if kind == "vector" else _dense_targets(2)
    return model, x, targets


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_shared_parameters_get_every_task_and_heads_only_their_own(name):
    """The split MultiTaskModule relies on: every encoder parameter receives a gradient from every task's loss
    (so gradient methods aggregate it), every head parameter only from its own task."""
    model, x, targets = _build(name)
    model.train()
    preds = model(x)
    losses, _ = model.task_losses(preds, targets, "train")
    named = [(n, p) for n, p in model.named_parameters()]
    for i, task in enumerate(model.task_names):
        grads = torch.autograd.grad(losses[i], [p for _, p in named], retain_graph=True, allow_unused=True)
        # relative to the task's largest gradient: a parameter that cannot change the loss (a conv bias under
        # BatchNorm) shows rounding noise of 1e-11..1e-9 of it, a live one at least 1e-4
        largest = max(g.abs().max() for g in grads if g is not None)
        for (param_name, _), grad in zip(named, grads):
            reached = grad is not None and bool(grad.abs().max() > 1e-6 * largest)
            if param_name.startswith("encoder."):
                assert reached, f"{name}: shared parameter {param_name} gets no gradient from task {task}"
            elif param_name.startswith("heads."):
                own = param_name.split(".")[1] == task
                assert reached == own, f"{name}: {param_name} and task {task}"


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_trains_a_step_with_a_gradient_method(name):
    model, x, targets = _build(name, aggregator="pcgrad")
    data = DataLoader(TensorMultiTaskDataset(x, targets), batch_size=len(x))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = tiny_trainer(max_steps=1, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(model, train_dataloaders=data, val_dataloaders=data)
    assert trainer.global_step == 1
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert any(n.startswith("encoder.") for n in changed) and any(n.startswith("heads.") for n in changed)
    metrics = trainer.callback_metrics
    assert ("val/seg/miou" in metrics) if "segnet" in name or name == "mtan" else ("val/a/acc" in metrics)


def test_hard_sharing_is_the_backbone():
    backbone = _mlp()
    x = torch.randn(2, 3, 2, 2)
    torch.testing.assert_close(HardParameterSharing(backbone)(x), backbone(x))
    with pytest.raises(ValueError, match="out_features"):
        HardParameterSharing(nn.ReLU())


def test_mmoe_mixes_experts_with_each_tasks_softmax_gate():
    torch.manual_seed(1)
    arch = MMoE(_mlp(), num_experts=3, in_features=12)
    head = nn.Identity()
    part_a, part_b = arch.build_task_head("a", head), arch.build_task_head("b", head)
    x = torch.randn(5, 3, 2, 2)
    experts = torch.stack([e(x) for e in arch.experts], 1)  # [5, 3, 6]
    for part in (part_a, part_b):
        w = torch.softmax(part.part.linear(x.flatten(1)), 1)
        expected = sum(w[:, k : k + 1] * experts[:, k] for k in range(3))
        torch.testing.assert_close(part(arch(x)), expected)
    assert not torch.allclose(part_a(arch(x)), part_b(arch(x)))  # different gates, different mixtures
    # the experts are re-initialized copies, not clones of one network
    assert not torch.equal(arch.experts[0][1].weight, arch.experts[1][1].weight)


def test_cgc_gate_mixes_own_and_shared_experts():
    torch.manual_seed(2)
    arch = CGC(_mlp(), in_features=12, num_specific=2, num_shared=1)
    part = arch.build_task_head("a", nn.Identity()).part
    x = torch.randn(4, 3, 2, 2)
    candidates = torch.stack([part.experts[0](x), part.experts[1](x), arch.shared_experts[0][0](x)], 1)
    w = torch.softmax(part.gate(x.flatten(1)), 1)
    torch.testing.assert_close(part(arch(x)), (w[:, :, None] * candidates).sum(1))


def test_cross_stitch_with_identity_stitches_is_independent_columns():
    arch = CrossStitch(_stitch_backbone(), tasks=["a", "b"], out_features=6, self_weight=1.0)
    x = torch.randn(3, 3, 2, 2)
    out = arch(x)
    for t in ("a", "b"):
        torch.testing.assert_close(out[t], arch.columns[t](x))
    torch.testing.assert_close(arch.alphas[0], torch.eye(2))
    mixed = CrossStitch(_stitch_backbone(), tasks=["a", "b", "c"], out_features=6)
    torch.testing.assert_close(mixed.alphas[1], torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]]))
    with pytest.raises(ValueError, match="built for tasks"):
        MultiTaskModule(mixed, {"a": ClassificationTask(2), "z": ClassificationTask(2)})


def test_segnet_keeps_odd_sizes_and_mtan_branches_differ():
    torch.manual_seed(3)
    net = SegNet(channels=(4, 6, 8), convs=(1, 2, 2))
    assert net(torch.randn(1, 3, 11, 13)).shape == (1, 4, 11, 13)
    mtan = MTAN(SegNet(channels=(4, 6, 8), convs=(1, 2, 2)))
    model = MultiTaskModule(mtan, {"seg": SegmentationTask(4), "depth": DepthTask()})
    out = model(torch.randn(2, 3, 11, 13))
    assert out["seg"].shape == (2, 4, 11, 13) and out["depth"].shape == (2, 1, 11, 13)
    # the shared 3x3 convs between attention stages belong to the encoder, not to a task
    head_params = {id(p) for p in model.heads.parameters()}
    assert all(id(p) not in head_params for p in mtan.enc_convs.parameters())
    with pytest.raises(ValueError, match="representation"):
        MultiTaskModule(MTAN(SegNet(channels=(4, 6, 8), convs=(1, 2, 2))), {"d": DepthTask()},
                           aggregator="mgda", gradient_mode="representation")  # fmt: skip


def test_mtan_deep_copy_keeps_the_shared_convs_shared():
    import copy

    model = MultiTaskModule(MTAN(SegNet(channels=(4, 6, 8), convs=(1, 2, 2))), {"d": DepthTask()})
    clone = copy.deepcopy(model)
    attention = clone.heads["d"].part
    assert attention._shared[0] is clone.encoder.enc_convs and attention._shared[0] is not model.encoder.enc_convs
    x = torch.randn(1, 3, 8, 8)
    model.eval(), clone.eval()
    torch.testing.assert_close(model(x)["d"], clone(x)["d"])


def test_dilated_resnet_has_output_stride_8_and_deeplab_head_keeps_the_map():
    encoder = ResNetDilated("resnet18")
    features = encoder(torch.randn(1, 3, 48, 64))
    assert features.shape == (1, 512, 6, 8) and encoder.out_features == 512
    head = DeepLabHead(512, 13, width=8)
    assert head(features).shape == (1, 13, 6, 8)
    with pytest.raises(FileNotFoundError, match="local weights"):
        ResNetDilated("resnet18", checkpoint_path="missing.pth")


def test_transformers_encoder_pooling_and_missing_extra(monkeypatch):
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(pool(hidden, mask, "cls"), torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(pool(hidden, mask, "mean"), torch.tensor([[2.0, 3.0]]))
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the extra were not installed
    with pytest.raises(ImportError, match="lightning-mtl\\[transformers\\]"):
        TransformersEncoder(config={"model_type": "bert"})
    with pytest.raises(ValueError, match="exactly one"):
        TransformersEncoder()


def test_transformers_encoder_loaded_from_a_folder_trains_with_dropout(tmp_path):
    """``from_pretrained`` hands back an eval-mode model; a fine-tuned encoder must still run its dropout."""
    config = {"model_type": "bert", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 32, "hidden_dropout_prob": 0.5}  # fmt: skip
    TransformersEncoder(config=config).model.save_pretrained(tmp_path)
    encoder = TransformersEncoder(path=str(tmp_path))
    assert encoder.training and encoder.model.training
    ids = torch.randint(1, 50, (2, 6))
    torch.manual_seed(0)
    first = encoder(ids)
    assert not torch.equal(first, encoder(ids))  # two dropout masks (2 x 16 outputs at p = 0.5)
    encoder.eval()
    torch.testing.assert_close(encoder(ids), encoder(ids), rtol=0, atol=0)
