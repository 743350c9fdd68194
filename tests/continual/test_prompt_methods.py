import pytest
import timm
import torch
import torch.nn.functional as F

from lightning_mtl.continual.dualprompt import DualPrompt
from lightning_mtl.continual.l2p import L2P
from lightning_mtl.continual.oneprompt import OnePrompt
from lightning_mtl.continual.prompts import PromptedViT
from lightning_mtl.continual.stream import StreamBatch
from tests.fixtures.trainers import one_thread  # noqa: F401

TINY = dict(img_size=16, patch_size=4, embed_dim=48, depth=5, num_heads=3, in_chans=3)
NUM_CLASSES = 6


def make(cls, **kwargs):
    torch.manual_seed(0)
    return cls(NUM_CLASSES, backbone="vit_tiny_patch16_224", vit_kwargs=TINY, **kwargs)


def images(batch=4, seed=1):
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def stream_batch(batch=4, num_seen=4):
    y = torch.tensor([0, 3, 1, 2])[:batch]
    return StreamBatch(images(batch), y, torch.full((batch,), num_seen), torch.ones(batch, dtype=torch.bool))


def timm_query(vit, x):
    with torch.no_grad():
        return vit.forward_features(x)[:, 0]


def cosine(query, keys):
    return torch.stack([torch.stack([q @ k / (q.norm() * k.norm()) for k in keys]) for q in query])


def masked_ce(logits, y, num_seen):
    logits = logits.clone()
    logits[:, num_seen:] = torch.finfo(logits.dtype).min
    return F.cross_entropy(logits, y)


def aim_keys(keys, query, targets):
    """Point key targets[b] (distinct) at query b, so the selection is known in advance."""
    with torch.no_grad():
        for b, t in enumerate(targets):
            keys[t] = query[b] + 0.01 * torch.randn_like(query[b])


# -- L2P ------------------------------------------------------------------------------------------
def test_l2p_features_are_the_mean_of_the_top_k_prompt_outputs():
    model = make(L2P, pool_size=6, length=3, top_k=2).eval()
    vit = model.vit.vit
    x = images()
    query = timm_query(vit, x)
    sim = cosine(query, model.pool.keys.detach())
    top = sim.argsort(dim=1, descending=True)[:, :2]
    with torch.no_grad():
        h = vit._pos_embed(vit.patch_embed(x))
        prompts = torch.stack([model.pool.prompts[top[b], 0].reshape(6, 48) for b in range(4)])
        h = vit.norm(vit.blocks(torch.cat([h[:, :1], prompts, h[:, 1:]], dim=1)))
        want = h[:, 1:7].mean(dim=1)
        got = model.features(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x), model.head(want), atol=1e-5, rtol=1e-5)


def test_l2p_loss_is_masked_ce_plus_pull_over_the_selected_keys():
    model = make(L2P, pool_size=6, length=2, top_k=2, pull_coef=0.3).train()
    batch = stream_batch()
    query = timm_query(model.vit.vit, batch.x)
    aim_keys(model.pool.keys, query, [4, 0, 1, 2])
    loss, extras = model.training_loss(batch)
    keys = model.pool.keys.detach()
    sim = cosine(query, keys)
    top = sim.argsort(dim=1, descending=True)[:, :2]
    assert top[:, 0].tolist() == [4, 0, 1, 2]
    assert model.last_selection[1].tolist() == top.tolist()
    pull = (1 - sim.gather(1, top)).sum(dim=1).mean()
    with torch.no_grad():
        ce = masked_ce(model.head(model.prompted_features(batch.x, top)), batch.y, 4)
    torch.testing.assert_close(extras["pull"], pull)
    torch.testing.assert_close(loss.detach(), ce + 0.3 * pull, atol=1e-5, rtol=1e-5)
    assert extras["logits"][:, 4:].eq(torch.finfo(torch.float32).min).all()


# -- DualPrompt -----------------------------------------------------------------------------------
def test_dualprompt_selects_top_1_by_key_matching_and_prefixes_g_and_e_prompts():
    model = make(DualPrompt, g_length=2, e_length=3, pool_size=5).eval()
    vit = model.vit.vit
    x = images()
    query = timm_query(vit, x)
    aim_keys(model.e_pool.keys, query, [3, 0, 1, 4])
    indices, similarity = model.select_prompts(model.vit.query(x))
    assert indices.tolist() == [3, 0, 1, 4]
    torch.testing.assert_close(similarity, cosine(query, model.e_pool.keys.detach()))
    # the prompted pass by hand: g-prompt at blocks 0-1, the selected e-prompt at blocks 2-4
    e = model.e_pool.prompts.detach()[indices]  # [B, 3 layers, 2, L, D]
    g = model.g_prompt.detach()
    prefixes = {0: (g[0, 0], g[0, 1]), 1: (g[1, 0], g[1, 1])}
    prefixes.update({2 + j: (e[:, j, 0], e[:, j, 1]) for j in range(3)})
    with torch.no_grad():
        want = PromptedViT(vit).forward_features(x, prefixes=prefixes)[:, 0]
        got = model.features(x)
    torch.testing.assert_close(got, want)
    # another e-prompt gives another feature: the selection reaches the pass
    with torch.no_grad():
        other = model.prompted_features(x, (indices + 1) % 5)
    assert not torch.allclose(other, got, atol=1e-4)


def test_dualprompt_pull_loss_value():
    model = make(DualPrompt, g_length=2, e_length=3, pool_size=5, pull_coef=0.7).train()
    batch = stream_batch(num_seen=5)
    query = timm_query(model.vit.vit, batch.x)
    aim_keys(model.e_pool.keys, query, [1, 2, 3, 0])
    loss, extras = model.training_loss(batch)
    cos = cosine(query, model.e_pool.keys.detach())
    pull = (1 - cos[torch.arange(4), torch.tensor([1, 2, 3, 0])]).mean()
    torch.testing.assert_close(extras["pull"], pull)
    _, indices, _ = model.last_selection
    with torch.no_grad():
        ce = masked_ce(model.head(model.prompted_features(batch.x, indices)), batch.y, 5)
    torch.testing.assert_close(loss.detach(), ce + 0.7 * pull, atol=1e-5, rtol=1e-5)
    # the selection is kept only in training
    model.eval()
    model.last_selection = None
    model(batch.x)
    assert model.last_selection is None


# -- OnePrompt ------------------------------------------------------------------------------------
def count_vit_passes(model, x):
    calls = []
    handle = model.vit.vit.patch_embed.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        model(x)
    handle.remove()
    return len(calls)


def test_oneprompt_makes_one_vit_pass_dualprompt_two():
    x = images()
    assert count_vit_passes(make(OnePrompt).eval(), x) == 1
    assert count_vit_passes(make(DualPrompt, g_length=2, e_length=3).eval(), x) == 2


def test_oneprompt_features_are_the_cls_of_the_shared_raw_prefix_pass():
    model = make(OnePrompt, g_length=2, e_length=4).eval()
    assert not model.vit.project_prefix
    assert model.prompt_layers == [2, 3, 4, 0, 1]
    assert [tuple(p.shape) for p in model.prompts] == [(2, 4, 48)] * 3 + [(2, 2, 48)] * 2
    assert not any("key" in name for name, _ in model.named_parameters())
    x = images()
    vit = model.vit.vit
    prefixes = {layer: (p[0].detach(), p[1].detach()) for layer, p in zip(model.prompt_layers, model.prompts)}
    with torch.no_grad():
        want = PromptedViT(vit, project_prefix=False).forward_features(x, prefixes=prefixes)[:, 0]
        got = model.features(x)
    torch.testing.assert_close(got, want)
    # one prompt for all inputs: a sample's feature does not depend on the rest of the batch
    with torch.no_grad():
        torch.testing.assert_close(model.features(x[1:2]), got[1:2], atol=1e-5, rtol=1e-5)
    assert model.prompt_parameters() == list(model.prompts)


def test_oneprompt_default_lengths_match_the_official_10_40():
    model = make(OnePrompt)
    # official `--prompt_param 10 40 10`: lengths count keys and values together
    assert [p.shape[0] * p.shape[1] for p in model.prompts] == [40, 40, 40, 10, 10]
    assert all(0 <= float(p.detach().min()) and float(p.detach().max()) <= 1 for p in model.prompts)


# -- training steps -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "kwargs", "trained"),
    [
        (L2P, dict(pool_size=8, length=2, top_k=2), {"pool.keys", "pool.prompts", "head.weight", "head.bias"}),
        (
            DualPrompt,
            dict(g_length=2, e_length=3, pool_size=8),
            {"g_prompt", "e_pool.keys", "e_pool.prompts", "head.weight", "head.bias"},
        ),
        (OnePrompt, dict(g_length=2, e_length=3), {f"prompts.{i}" for i in range(5)} | {"head.weight", "head.bias"}),
    ],
)
def test_a_training_step_changes_only_prompts_keys_and_head(cls, kwargs, trained):
    model = make(cls, **kwargs).train()
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trained
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = model.configure_optimizers()
    loss, _ = model.training_loss(stream_batch())
    loss.backward()
    optimizer.step()
    after = dict(model.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == trained
    assert not model.vit.vit.training
    # Adam leaves the pool entries no input selected untouched
    if cls is not OnePrompt:
        pool = model.pool if cls is L2P else model.e_pool
        name = "pool" if cls is L2P else "e_pool"
        unselected = set(range(8)) - set(model.last_selection[1].flatten().tolist())
        assert unselected
        for entry in unselected:
            assert torch.equal(pool.prompts[entry], before[f"{name}.prompts"][entry])
            assert torch.equal(pool.keys[entry], before[f"{name}.keys"][entry])


def test_dualprompt_trains_under_lightning_with_the_vit_in_eval_mode():
    from torch.utils.data import DataLoader

    from tests.fixtures.trainers import tiny_trainer

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return StreamBatch(images(1, seed=i)[0], torch.tensor(i % 3), torch.tensor(3), torch.tensor(True))

    model = make(DualPrompt, g_length=2, e_length=3)
    vit_before = {k: v.clone() for k, v in model.vit.state_dict().items()}
    g_before = model.g_prompt.detach().clone()
    seen_modes = []
    model.on_train_batch_start = lambda *args: seen_modes.append(model.vit.vit.training)
    tiny_trainer(max_steps=2).fit(model, DataLoader(Items(), batch_size=4))
    assert seen_modes == [False, False]
    assert all(torch.equal(v, model.vit.state_dict()[k]) for k, v in vit_before.items())
    assert not torch.equal(g_before, model.g_prompt.detach())
    assert int(model.seen_classes) == 3


def test_methods_accept_a_ready_vit_module():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY)
    model = DualPrompt(NUM_CLASSES, backbone=vit, g_length=2, e_length=3)
    assert model.vit.vit is vit
    assert model(images()).shape == (4, NUM_CLASSES)
    with pytest.raises(ValueError, match="e_layers"):
        make(DualPrompt, e_layers=(2, 7))
