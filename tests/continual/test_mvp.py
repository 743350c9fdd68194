import math

import pytest
import torch
import torch.nn.functional as F

from lightning_mtl.continual.mvp import (
    _per_sample_head_grads_loop,
    adaptive_feature_scale,
    contrastive_prompt_loss,
    focal_weights,
    frequency_weighted_distance,
    gradient_similarity_focal_loss,
    gradient_similarity_scores,
    instance_logit_mask,
    key_distances,
    masked_head_logits,
    per_sample_head_grads,
    select_by_frequency,
)
from tests.fixtures.trainers import one_thread  # noqa: F401

MIN = torch.finfo(torch.float32).min


# -- instance-wise logit mask --------------------------------------------------------------------------
def test_instance_logit_mask_is_two_sigmoid_of_the_selected_row():
    mask_params = torch.tensor([[0.0, -1.0, 2.0], [1.0, 0.0, -3.0]])
    factors = instance_logit_mask(mask_params, torch.tensor([1, 0, 1]))
    sig = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731
    expected = torch.tensor(
        [[2 * sig(1.0), 1.0, 2 * sig(-3.0)], [1.0, 2 * sig(-1.0), 2 * sig(2.0)], [2 * sig(1.0), 1.0, 2 * sig(-3.0)]]
    )
    torch.testing.assert_close(factors, expected)
    # several selected prompts per sample: their rows are averaged before the sigmoid
    two = instance_logit_mask(mask_params, torch.tensor([[0, 1]]))
    torch.testing.assert_close(two, 2 * torch.sigmoid(mask_params.mean(0, keepdim=True)))


def test_masked_head_logits_multiply_bias_too_then_mask_unseen():
    weight = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    bias = torch.tensor([0.5, -1.0, 0.0])
    f = torch.tensor([[2.0, 3.0]])
    m = torch.tensor([[0.5, 2.0, 1.0]])
    logits = masked_head_logits(f, weight, bias, m, num_seen=2)
    # (W f + b) = [2.5, 5.0, 5.0]; times m = [1.25, 10.0, 5.0]; class 2 unseen
    torch.testing.assert_close(logits, torch.tensor([[1.25, 10.0, MIN]]))
    torch.testing.assert_close(masked_head_logits(f, weight, bias), torch.tensor([[2.5, 5.0, 5.0]]))


# -- frequency-weighted selection and the contrastive key loss ---------------------------------------
def test_frequency_weighting_moves_the_selection_off_an_overused_key():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    query = torch.tensor([[1.0, 0.5]])  # nearer to key 0
    d = key_distances(query, keys)
    cos0, cos1 = 1.0 / math.sqrt(1.25), 0.5 / math.sqrt(1.25)
    torch.testing.assert_close(d, torch.tensor([[1 - cos0, 1 - cos1]]))
    assert select_by_frequency(query, keys).tolist() == [0]
    assert select_by_frequency(query, keys, torch.tensor([0, 0])).tolist() == [0]
    counts = torch.tensor([9, 0])  # d0 * 10 = 1.06 > d1 * 1 = 0.55
    torch.testing.assert_close(frequency_weighted_distance(d, counts), torch.tensor([[(1 - cos0) * 10, 1 - cos1]]))
    assert select_by_frequency(query, keys, counts).tolist() == [1]


def _contrastive_by_hand(query, keys, indices, counts, eps=1e-6):
    b, p = len(indices), len(keys)
    pos, apart = 0.0, 0.0
    for i in range(b):
        k = int(indices[i])
        tau = float(counts[k]) + 1.0
        pos += math.exp((1 - F.cosine_similarity(query[i], keys[k], dim=0).item()) / tau) / b
        for j in range(p):
            apart += math.exp((1 - F.cosine_similarity(keys[k], keys[j], dim=0).item()) / tau) / (b * p)
    return -math.log(apart / (pos + apart) + eps)


def test_contrastive_prompt_loss_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    query, keys = torch.randn(6, 5, generator=g), torch.randn(4, 5, generator=g)
    indices, counts = torch.tensor([0, 2, 2, 1, 3, 0]), torch.tensor([3, 0, 7, 1])
    loss = contrastive_prompt_loss(query, keys, indices, counts)
    assert loss.item() == pytest.approx(_contrastive_by_hand(query, keys, indices, counts), rel=1e-5)


def test_contrastive_prompt_loss_equals_the_official_expression_for_one_selected_key():
    # the official code broadcasts [B, 1, P] / [B, 1]; with one key selected (one temperature) it is ours
    g = torch.Generator().manual_seed(1)
    query, keys = torch.randn(5, 8, generator=g), torch.randn(3, 8, generator=g)
    counts = torch.tensor([4.0, 2.0, 0.0])
    topk = torch.full((5, 1), 1)
    mass = counts + 1
    distance = (1 - F.cosine_similarity(query.unsqueeze(1), keys, dim=-1))[torch.arange(5).unsqueeze(1), topk].squeeze()
    key_wise = 1 - F.cosine_similarity(keys.unsqueeze(1), keys, dim=-1)
    official = -(
        (key_wise[topk] / mass[topk]).exp().mean()
        / ((distance / mass[topk]).exp().mean() + (key_wise[topk] / mass[topk]).exp().mean())
        + 1e-6
    ).log()
    torch.testing.assert_close(contrastive_prompt_loss(query, keys, topk[:, 0], counts), official)


def test_contrastive_prompt_loss_pulls_the_query_and_pushes_keys_apart():
    g = torch.Generator().manual_seed(2)
    query = torch.randn(4, 6, generator=g)
    keys = torch.randn(3, 6, generator=g).requires_grad_(True)
    indices, counts = torch.tensor([0, 0, 1, 2]), torch.zeros(3)
    before_pull = (1 - F.cosine_similarity(query, keys[indices], dim=-1)).mean().item()
    before_apart = key_distances(keys, keys).sum().item()
    contrastive_prompt_loss(query, keys, indices, counts).backward()
    with torch.no_grad():
        stepped = keys - 0.05 * keys.grad
    assert (1 - F.cosine_similarity(query, stepped[indices], dim=-1)).mean().item() < before_pull
    assert key_distances(stepped, stepped).sum().item() > before_apart


# -- per-sample head gradients ---------------------------------------------------------------------------
def _head_problem(seed=0, b=7, c=5, d=4):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(b, d, generator=g)
    weight, bias = torch.randn(c, d, generator=g), torch.randn(c, generator=g)
    targets = torch.randint(0, c - 1, (b,), generator=g)
    logit_mask = instance_logit_mask(torch.randn(3, c, generator=g), torch.randint(0, 3, (b,), generator=g))
    return features, weight, bias, targets, logit_mask


@pytest.mark.parametrize("masked", [False, True])
def test_per_sample_head_grads_match_autograd_per_sample_and_torch_func(masked):
    features, weight, bias, targets, logit_mask = _head_problem()
    kwargs = dict(logit_mask=logit_mask, num_seen=4) if masked else {}
    fast = per_sample_head_grads(features, weight, bias, targets, **kwargs)
    assert fast.shape == (7, 5, 4)
    torch.testing.assert_close(fast, _per_sample_head_grads_loop(features, weight, bias, targets, **kwargs))

    def one_loss(w, f, y, m):
        z = masked_head_logits(f[None], w, bias, m[None] if masked else None, 4 if masked else None)
        return F.cross_entropy(z, y[None])

    vmapped = torch.func.vmap(torch.func.grad(one_loss), in_dims=(None, 0, 0, 0))(weight, features, targets, logit_mask)
    torch.testing.assert_close(fast, vmapped)
    rows = per_sample_head_grads(features, weight, bias, targets, target_rows=True, **kwargs)
    torch.testing.assert_close(rows, fast[torch.arange(7), targets])
    loop_rows = _per_sample_head_grads_loop(features, weight, bias, targets, target_rows=True, **kwargs)
    torch.testing.assert_close(rows, loop_rows)
    if masked:  # the unseen class gets no gradient
        assert fast[:, 4].abs().max() == 0


def test_gradient_similarity_scores_match_autograd():
    features, weight, bias, targets, logit_mask = _head_problem(seed=3, b=9)
    scores = gradient_similarity_scores(features, weight, bias, targets, logit_mask, num_seen=4)
    w = weight.clone().requires_grad_(True)
    z = masked_head_logits(features, w, bias, logit_mask, 4)
    per_sample = [
        torch.autograd.grad(F.cross_entropy(z[i : i + 1], targets[i : i + 1]), w, retain_graph=True)[0]
        for i in range(9)
    ]
    (batch,) = torch.autograd.grad(F.cross_entropy(z, targets), w)
    expected = torch.stack(
        [1 - F.cosine_similarity(per_sample[i][targets[i]], batch[targets[i]], dim=0) for i in range(9)]
    )
    torch.testing.assert_close(scores, expected)
    assert not scores.requires_grad and (scores >= 0).all() and (scores <= 2).all()


def test_focal_loss_is_the_per_sample_weighted_cross_entropy():
    g = torch.Generator().manual_seed(4)
    logits, targets = torch.randn(5, 3, generator=g), torch.tensor([0, 2, 1, 1, 0])
    scores = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0])
    torch.testing.assert_close(focal_weights(scores), torch.tensor([0.5, 0.625, 1.0, 1.625, 2.5]))
    loss = gradient_similarity_focal_loss(logits, targets, scores, alpha=0.5, gamma=2.0)
    by_hand = (
        sum((0.5 + 0.5 * scores[i].item() ** 2) * -F.log_softmax(logits[i], 0)[targets[i]].item() for i in range(5)) / 5
    )
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    # not the official batch-mean form: mean(CE) * mean(w)
    official = F.cross_entropy(logits, targets) * focal_weights(scores).mean()
    assert abs(loss.item() - official.item()) > 1e-3
    # alpha = 0 is plain cross-entropy
    plain = gradient_similarity_focal_loss(logits, targets, scores, alpha=0.0)
    torch.testing.assert_close(plain, F.cross_entropy(logits, targets))


# -- adaptive feature scaling ----------------------------------------------------------------------------
def test_adaptive_feature_scale_formula():
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    features = torch.tensor([[3.0, 0.0], [3.0, 0.0], [-2.0, 0.0], [1.0, 1.0]], requires_grad=True)
    targets = torch.tensor([0, 1, 0, 0])
    scale = adaptive_feature_scale(features, weight, targets, margin=0.5)
    # cos = 1, 0, -1, 1/sqrt(2)
    expected = torch.tensor([[1 / 0.5], [1 / 1.5], [1 / 2.5], [1 / (1.5 - 1 / math.sqrt(2))]])
    torch.testing.assert_close(scale, expected)
    assert not scale.requires_grad


# -- the module ------------------------------------------------------------------------------------------
TINY = dict(img_size=16, patch_size=4, embed_dim=48, depth=5, num_heads=3, in_chans=3)
NUM_CLASSES = 6


def _tiny(cls=None, seed=0, **kwargs):
    from lightning_mtl.continual.mvp import MVP

    torch.manual_seed(seed)
    return (cls or MVP)(NUM_CLASSES, backbone="vit_tiny_patch16_224", vit_kwargs=TINY, pool_size=4, **kwargs)


def _batch(seed=0, b=6, num_seen=4):
    from lightning_mtl.continual.stream import StreamBatch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 16, 16, generator=g)
    y = torch.randint(0, num_seen, (b,), generator=g)
    return StreamBatch(x, y, torch.full((b,), num_seen), torch.ones(b, dtype=torch.bool))


def test_mvp_training_loss_equals_its_components_assembled_by_hand():
    model = _tiny()
    batch = _batch()
    with torch.no_grad():
        model.logit_mask.normal_()
        # keys near the queries of the first samples and uneven counts: the batch selects every key, at
        # different temperatures, and the counts change some selections
        query = model.vit.query(batch.x)
        noise = torch.randn(4, query.shape[1], generator=torch.Generator().manual_seed(0))
        model.e_pool.keys.copy_(query[:4] + 0.5 * query.std() * noise)
        model.prompt_counts.copy_(torch.tensor([2, 1, 2, 2]))
    counts = model.prompt_counts.clone()
    loss, extras = model.training_loss(batch)

    # by hand: query of the plain frozen timm pass, selection by d * (n + 1)
    with torch.no_grad():
        query = model.vit.vit.forward_features(batch.x)[:, 0]
        keys = model.e_pool.keys
        dist = torch.stack([1 - F.cosine_similarity(q[None], keys, dim=1) for q in query])
        indices = (dist * (counts + 1)).argmin(1)
        assert len(indices.unique()) >= 3 and (indices != dist.argmin(1)).any()
        f = model.prompted_features(batch.x, indices)
        w, b = model.head.weight, model.head.bias
        m = 2 * torch.sigmoid(model.logit_mask[indices])
        seen = torch.arange(NUM_CLASSES) < 4
        total = 0.0
        grads = _per_sample_head_grads_loop(f, w, b, batch.y, m, 4)
        z = ((f @ w.T + b) * m).masked_fill(~seen, MIN)
        with torch.enable_grad():
            ww = w.detach().clone().requires_grad_(True)
            batch_ce = F.cross_entropy(((f @ ww.T + b) * m).masked_fill(~seen, MIN), batch.y)
            (batch_grad,) = torch.autograd.grad(batch_ce, ww)
        for i in range(len(batch.y)):
            yi = int(batch.y[i])
            s = 1 - F.cosine_similarity(grads[i, yi], batch_grad[yi], dim=0).item()
            cos_wf = F.cosine_similarity(w[yi], f[i], dim=0).item()
            zi = ((w @ (f[i] / (1 - cos_wf + 0.5)) + b) * m[i]).masked_fill(~seen, MIN)
            ce = -F.log_softmax(zi, 0)[yi].item()
            total += (0.5 + 0.5 * s**2) * ce / len(batch.y)
        total += _contrastive_by_hand(query, keys, indices, counts)
    assert loss.item() == pytest.approx(total, rel=1e-5)
    torch.testing.assert_close(extras["logits"], z)
    # the counts grew by this step's selections, after the loss used the old ones
    torch.testing.assert_close(model.prompt_counts, counts + torch.bincount(indices, minlength=4))
    # evaluation reads the unscaled, instance-masked logits of the same selection rule
    model.eval()
    with torch.no_grad():
        new_indices = (dist * (model.prompt_counts + 1)).argmin(1)
        new_f = model.prompted_features(batch.x, new_indices)
        expected = (new_f @ w.T + b) * 2 * torch.sigmoid(model.logit_mask[new_indices])
        torch.testing.assert_close(model(batch.x), expected)


def test_mvp_with_every_component_off_is_dualprompt():
    from lightning_mtl.continual.dualprompt import DualPrompt

    off = dict(use_mask=False, use_contrastive=False, use_focal=False, use_afs=False)
    mvp, dual = _tiny(**off), _tiny(cls=DualPrompt)
    batch = _batch(seed=1)
    mvp_loss, mvp_extras = mvp.training_loss(batch)
    dual_loss, dual_extras = dual.training_loss(batch)
    torch.testing.assert_close(mvp_loss, dual_loss)
    torch.testing.assert_close(mvp_extras["pull"], dual_extras["pull"])
    mvp_loss.backward()
    dual_loss.backward()
    torch.testing.assert_close(mvp.e_pool.keys.grad, dual.e_pool.keys.grad)
    torch.testing.assert_close(mvp.head.weight.grad, dual.head.weight.grad)
    assert not mvp.logit_mask.requires_grad and all(p is not mvp.logit_mask for p in mvp.trainable_parameters())
    # and the default MVP is not
    full = _tiny()
    assert abs(full.training_loss(batch)[0].item() - dual_loss.item()) > 1e-3


def test_mvp_switches_each_change_only_their_term():
    batch = _batch(seed=2)
    base = _tiny(use_mask=False, use_contrastive=False, use_focal=False, use_afs=False)
    ref, _ = base.training_loss(batch)
    # use_afs alone: cross-entropy of the scaled features, pull loss unchanged
    afs = _tiny(use_mask=False, use_contrastive=False, use_focal=False)
    loss, extras = afs.training_loss(batch)
    with torch.no_grad():
        query = afs.vit.query(batch.x)
        indices = afs.select_prompts(query)[0]
        f = afs.prompted_features(batch.x, indices)
        f = f * adaptive_feature_scale(f, afs.head.weight, batch.y)
        ce = F.cross_entropy(masked_head_logits(f, afs.head.weight, afs.head.bias, None, 4), batch.y)
    torch.testing.assert_close(loss, ce + extras["pull"])
    assert abs(loss.item() - ref.item()) > 1e-4
    # use_mask alone: the mask rows of the selected prompts get gradient, the others none
    masked = _tiny(use_contrastive=False, use_focal=False, use_afs=False)
    loss, _ = masked.training_loss(batch)
    loss.backward()
    selected = masked.select_prompts(masked.vit.query(batch.x))[0].unique()
    grad_rows = masked.logit_mask.grad.abs().sum(1) > 0
    assert grad_rows.nonzero().flatten().tolist() == selected.tolist()
    assert masked.logit_mask.grad[:, 4:].abs().max() == 0  # unseen classes learn nothing


def test_mvp_hyperparameters_and_checkpointed_counts():
    model = _tiny(use_afs=False, gamma=1.0)
    assert model.hparams["use_afs"] is False and model.hparams["gamma"] == 1.0 and model.hparams["pool_size"] == 4
    model.training_loss(_batch())
    state = model.state_dict()
    assert int(state["prompt_counts"].sum()) == 6
    fresh = _tiny(use_afs=False, gamma=1.0, seed=5)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.prompt_counts, model.prompt_counts)


def test_mvp_trains_and_evaluates_under_lightning():
    from torch.utils.data import DataLoader, Dataset

    from lightning_mtl.continual.stream import StreamBatch
    from tests.fixtures.trainers import tiny_trainer

    class Items(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            x = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(i))
            return StreamBatch(x, torch.tensor(i % 3), torch.tensor(3), torch.tensor(True))

    model = _tiny(g_length=2, e_length=3)
    trained = {"g_prompt", "e_pool.keys", "e_pool.prompts", "head.weight", "head.bias", "logit_mask"}
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trained
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    tiny_trainer(max_steps=2).fit(model, DataLoader(Items(), batch_size=4))
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}
    assert changed == trained
    assert int(model.prompt_counts.sum()) == 8 and int(model.seen_classes) == 3
    # evaluation: masked logits over the 3 seen classes
    eval_items = [(Items()[i].x, Items()[i].y) for i in range(8)]
    (metrics,) = tiny_trainer().validate(model, DataLoader(eval_items, batch_size=4), verbose=False)
    assert 0.0 <= metrics["val/acc"] <= 1.0 and math.isfinite(metrics["val/loss"])
