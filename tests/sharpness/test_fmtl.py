"""F-MTL against hand-written steps on tiny models: one task is SAM, LS is its formula, any aggregator
gets Agg(g) + Agg(g_SAM - g), heads take their own SAM gradient, BatchNorm counts one update."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_mtl import ClassificationTask, MultiTaskModule, RegressionTask
from lightning_mtl.aggregators import create_aggregator
from lightning_mtl.sharpness.fmtl import FMTL

RHO = 0.3


def _module(tasks=("a", "b"), aggregator="ls", encoder=None, **fmtl):
    torch.manual_seed(0)
    encoder = encoder or nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh())
    spec = {name: (ClassificationTask(3) if k % 2 == 0 else RegressionTask(1)) for k, name in enumerate(tasks)}
    return MultiTaskModule(encoder=encoder, feature_dim=5, tasks=spec, aggregator=aggregator, fmtl=FMTL(**fmtl))


def _batch(tasks=("a", "b")):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 6, generator=g)
    y = {n: (torch.randint(0, 3, (10,), generator=g) if k % 2 == 0 else torch.randn(10, generator=g))
         for k, n in enumerate(tasks)}  # fmt: skip
    return x, y


def _loss(module, name, x, y, shared=None, head=None):
    """Task loss at the module's parameters, or at explicit (shared, head) parameter lists."""
    enc, hd = copy.deepcopy(module.encoder), copy.deepcopy(module.heads[name])
    with torch.no_grad():
        for p, v in zip(enc.parameters(), shared or []):
            p.copy_(v)
        for p, v in zip(hd.parameters(), head or []):
            p.copy_(v)
    pred = hd(enc(x))
    loss = (
        F.cross_entropy(pred, y[name])
        if isinstance(module.tasks[name], ClassificationTask)
        else F.mse_loss(pred.squeeze(1), y[name])
    )
    return loss, list(enc.parameters()), list(hd.parameters())


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def _sam_grads(module, name, x, y, rho, adaptive=False, joint=False):
    """g, h at the current point and g_SAM, h_SAM at the task's own perturbed point, by hand."""
    loss, enc, hd = _loss(module, name, x, y)
    grads = torch.autograd.grad(loss, enc + hd)
    g, h = grads[: len(enc)], grads[len(enc) :]

    def ascent(gs, ps):
        scaled = [gi * (p.abs() if adaptive else 1) for gi, p in zip(gs, ps)]
        norm = _flat(scaled).norm()
        return [rho * gi * (p.abs() if adaptive else 1) ** 2 / (norm + 1e-12) for gi, p in zip(gs, ps)]

    if joint:
        e = ascent(list(g) + list(h), enc + hd)
        e_g, e_h = e[: len(enc)], e[len(enc) :]
    else:
        e_g, e_h = ascent(g, enc), ascent(h, hd)
    shared = [p.detach() + e for p, e in zip(enc, e_g)]
    head = [p.detach() + e for p, e in zip(hd, e_h)]
    loss_p, enc_p, hd_p = _loss(module, name, x, y, shared, head)
    grads_p = torch.autograd.grad(loss_p, enc_p + hd_p)
    return _flat(g), _flat(grads_p[: len(enc)]), list(grads_p[len(enc) :])


def _written(module):
    return _flat([p.grad for p in module.encoder.parameters()])


@pytest.mark.parametrize("adaptive", [False, True])
def test_one_task_with_joint_normalization_is_sam(adaptive):
    module = _module(tasks=("a",), rho=RHO, adaptive=adaptive, normalization="joint")
    x, y = _batch(("a",))
    reference = copy.deepcopy(module)
    module.backward(module.training_step((x, y), 0))
    _, g_sam, h_sam = _sam_grads(reference, "a", x, y, RHO, adaptive=adaptive, joint=True)
    torch.testing.assert_close(_written(module), g_sam, atol=1e-6, rtol=1e-5)
    for p, expected in zip(module.heads["a"].parameters(), h_sam):
        torch.testing.assert_close(p.grad, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", ["flat", "direct"])
def test_linear_scalarization_is_the_sum_of_the_tasks_sam_gradients(variant):
    """F-LS: both variants give sum_i g_i^SAM, each head its own h_i^SAM (separate normalization)."""
    module = _module(rho=RHO, variant=variant)
    x, y = _batch()
    reference = copy.deepcopy(module)
    module.backward(module.training_step((x, y), 0))
    expected = 0
    for name in ("a", "b"):
        _, g_sam, h_sam = _sam_grads(reference, name, x, y, RHO)
        expected = expected + g_sam
        for p, h in zip(module.heads[name].parameters(), h_sam):
            torch.testing.assert_close(p.grad, h, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(_written(module), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["pcgrad", "mgda", "cagrad", "imtl_g", "nashmtl", "graddrop"])
@pytest.mark.parametrize("variant", ["flat", "direct"])
def test_any_aggregator_gets_its_formula(name, variant):
    """flat: Agg(g) + Agg(g^SAM - g), with a second, identical aggregator for the flat stream; direct:
    Agg(g^SAM). The aggregators are replayed from copies taken before the step."""
    module = _module(aggregator=create_aggregator(name, seed=0) if name == "graddrop" else name, rho=RHO,
                     adaptive=True, variant=variant)  # fmt: skip
    x, y = _batch()
    reference = copy.deepcopy(module)
    module.backward(module.training_step((x, y), 0))
    rows = [_sam_grads(reference, n, x, y, RHO, adaptive=True) for n in ("a", "b")]
    jac = torch.stack([r[0] for r in rows])
    jac_sam = torch.stack([r[1] for r in rows])
    if variant == "direct":
        expected = reference.aggregator.aggregate(jac_sam)
    else:
        expected = reference.aggregator.aggregate(jac) + reference.flat_aggregator.aggregate(jac_sam - jac)
    torch.testing.assert_close(_written(module), expected, atol=1e-5, rtol=1e-4)
    for n, r in zip(("a", "b"), rows):
        for p, h in zip(module.heads[n].parameters(), r[2]):
            torch.testing.assert_close(p.grad, h, atol=1e-6, rtol=1e-5)


def test_uncertainty_weighting_applies_its_weights_and_trains_its_own_parameters():
    module = _module(aggregator="uw", rho=RHO)
    with torch.no_grad():
        module.aggregator.log_vars.copy_(torch.tensor([0.4, -0.3]))
    x, y = _batch()
    reference = copy.deepcopy(module)
    module.backward(module.training_step((x, y), 0))
    losses = torch.stack([_loss(reference, n, x, y)[0] for n in ("a", "b")]).detach().requires_grad_()
    objective = reference.aggregator(losses)
    weights, log_var_grad = torch.autograd.grad(objective, [losses, reference.aggregator.log_vars])
    expected = sum(w * _sam_grads(reference, n, x, y, RHO)[1] for w, n in zip(weights, ("a", "b")))
    torch.testing.assert_close(_written(module), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(module.aggregator.log_vars.grad, log_var_grad)
    h_sam = _sam_grads(reference, "b", x, y, RHO)[2]
    for p, h in zip(module.heads["b"].parameters(), h_sam):
        torch.testing.assert_close(p.grad, weights[1] * h, atol=1e-6, rtol=1e-5)


def test_batchnorm_statistics_count_one_update_per_step():
    encoder = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh())
    module = _module(encoder=encoder, rho=RHO)
    x, y = _batch()
    expected = copy.deepcopy(encoder)
    expected(x)  # one forward in train mode
    module.backward(module.training_step((x, y), 0))
    bn, ref = module.encoder[1], expected[1]
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)


def test_parameters_are_restored_exactly_and_a_loss_scale_is_undone():
    """16-mixed hands backward() the loss times GradScaler's scale: S times the unscaled gradients,
    and the parameters come back bit for bit after the perturbed passes."""
    written = []
    for scale in (1.0, 512.0):
        module = _module(aggregator="pcgrad", rho=RHO)
        before = [p.detach().clone() for p in module.parameters()]
        x, y = _batch()
        module.backward(module.training_step((x, y), 0) * scale)
        assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))
        written.append(_written(module) / scale)
    torch.testing.assert_close(written[1], written[0], atol=1e-6, rtol=1e-5)


def test_representation_level_is_refused():
    with pytest.raises(ValueError, match="gradient_mode='parameter'"):
        MultiTaskModule(encoder=nn.Linear(6, 5), feature_dim=5, tasks={"a": ClassificationTask(3)},
                        gradient_mode="representation", aggregator="mgda", fmtl=FMTL())  # fmt: skip


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="normalization"):
        FMTL(normalization="both")
    with pytest.raises(ValueError, match="variant"):
        FMTL(variant="sam")
    with pytest.raises(ValueError, match="rho"):
        FMTL(rho=-1.0)


@pytest.mark.parametrize("chunk_size", [None, 1, 2])
@pytest.mark.parametrize("batchnorm", [False, True])
def test_vmapped_perturbed_passes_equal_the_loop(chunk_size, batchnorm):
    """The m perturbed passes as one vmapped pass over stacked parameter copies (chunked or not)
    give the loop's gradients, and the BatchNorm statistics still count one update."""
    tasks = ("a", "b", "c")
    written, stats = [], []
    for batched in (False, True):
        torch.manual_seed(0)
        encoder = (nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh()) if batchnorm
                   else nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)))  # fmt: skip
        module = _module(tasks=tasks, aggregator="pcgrad", encoder=encoder, rho=RHO, adaptive=True,
                         batched=batched, chunk_size=chunk_size)  # fmt: skip
        module.backward(module.training_step(_batch(tasks), 0))
        written.append([p.grad.clone() for p in module.parameters() if p.grad is not None])
        stats.append([b.clone() for b in module.encoder.buffers()])
    assert len(written[0]) == len(written[1])
    for a, b in zip(*written):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for a, b in zip(*stats):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("batched", [False, True])
def test_bf16_mixed_runs_every_pass_under_autocast_and_gives_the_fp32_step(batched):
    from tests.fixtures.trainers import tiny_trainer

    x, y = _batch()
    updates = []
    for precision in ("32-true", "bf16-mixed"):
        module = _module(aggregator="cagrad", rho=RHO, batched=batched)
        module.optimizer_factory = lambda p: torch.optim.SGD(p, lr=0.1)
        dtypes = []
        module.heads["a"].register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
        start = [p.detach().clone() for p in module.encoder.parameters()]
        trainer = tiny_trainer(max_steps=1, limit_val_batches=0, precision=precision, gradient_clip_val=10.0)
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([(x, y)], batch_size=None))
        assert len(dtypes) == 2  # the first pass and task a's perturbed pass
        expected = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
        assert all(d == expected for d in dtypes), dtypes
        updates.append(torch.cat([(p.detach() - s).flatten() for p, s in zip(module.encoder.parameters(), start)]))
    assert (updates[0] - updates[1]).norm() < 0.05 * updates[0].norm()
