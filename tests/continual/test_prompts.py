import math

import pytest
import timm
import torch
import torch.nn.functional as F

from lightning_mtl.continual.prompts import PromptedViT, PromptPool, build_prompted_vit, create_vit
from tests.fixtures.trainers import one_thread  # noqa: F401

TINY = dict(img_size=16, patch_size=4, embed_dim=48, depth=5, num_heads=3, in_chans=3)


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **{**TINY, **kwargs})


def images(batch=2, seed=1):
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def tokens(*shape, seed=2):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def embed(vit, x):
    """The sequence timm feeds to its first block."""
    return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))


@pytest.mark.parametrize("project_prefix", [True, False])
def test_no_and_zero_length_prompts_leave_timm_output_exactly(project_prefix):
    vit = tiny_vit()
    pv = PromptedViT(vit, project_prefix=project_prefix)
    x = images()
    ref = vit.forward_features(x)
    empty = torch.zeros(2, 0, 48)
    assert torch.equal(pv.forward_features(x), ref)
    assert torch.equal(pv.forward_features(x, prompts={0: empty, 3: empty}), ref)
    # the prefix path runs for every block here (it is not short-cut for empty prefixes)
    assert torch.equal(pv.forward_features(x, prefixes={i: (empty, empty) for i in range(5)}), ref)
    assert torch.equal(pv.query(x), ref[:, 0])


def hand_prefix_block(block, x, pk, pv, project):
    """timm's pre-norm block written out, with prefix keys / values in the attention."""
    attn = block.attn
    heads, d = attn.num_heads, attn.head_dim
    dim = heads * d
    h = F.layer_norm(x, (x.shape[-1],), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    w, b = attn.qkv.weight, attn.qkv.bias
    q, k, v = h @ w[:dim].T + b[:dim], h @ w[dim : 2 * dim].T + b[dim : 2 * dim], h @ w[2 * dim :].T + b[2 * dim :]
    if project:
        pk, pv = pk @ w[dim : 2 * dim].T + b[dim : 2 * dim], pv @ w[2 * dim :].T + b[2 * dim :]
    k, v = torch.cat([pk, k], dim=1), torch.cat([pv, v], dim=1)
    out = []
    for head in range(heads):
        s = slice(head * d, (head + 1) * d)
        a = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(d), dim=-1)
        out.append(a @ v[..., s])
    x = x + attn.proj(torch.cat(out, dim=-1))
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("project_prefix", [True, False])
def test_prefix_tuning_equals_hand_attention_with_concatenated_keys_values(project_prefix):
    vit = tiny_vit()
    pv = PromptedViT(vit, project_prefix=project_prefix)
    x = images()
    pk, pval = tokens(2, 4, 48, seed=3), tokens(2, 4, 48, seed=4)
    got = pv.forward_features(x, prefixes={2: (pk, pval)})
    with torch.no_grad():
        h = embed(vit, x)
        for block in vit.blocks[:2]:
            h = block(h)
        h = hand_prefix_block(vit.blocks[2], h, pk, pval, project_prefix)
        for block in vit.blocks[3:]:
            h = block(h)
        want = vit.norm(h)
    assert got.shape == want.shape == (2, 17, 48)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # and the prefix matters
    assert not torch.allclose(got, vit.forward_features(x), atol=1e-3)


def test_prefix_shared_over_the_batch_equals_expanded():
    pv = PromptedViT(tiny_vit())
    x = images()
    pk, pval = tokens(3, 48, seed=5), tokens(3, 48, seed=6)
    shared = pv.forward_features(x, prefixes={0: (pk, pval)})
    batched = pv.forward_features(x, prefixes={0: (pk.expand(2, -1, -1), pval.expand(2, -1, -1))})
    assert torch.equal(shared, batched)


def test_prompt_tuning_equals_timm_blocks_on_the_concatenated_sequence():
    vit = tiny_vit()
    pv = PromptedViT(vit)
    x = images()
    p0, p3 = tokens(2, 5, 48, seed=7), tokens(2, 2, 48, seed=8)
    got = pv.forward_features(x, prompts={0: p0, 3: p3})
    with torch.no_grad():
        h = embed(vit, x)
        h = torch.cat([h[:, :1], p0, h[:, 1:]], dim=1)  # [CLS], prompt, patches
        h = vit.blocks[:3](h)
        h = torch.cat([h[:, :1], p3, h[:, 1:]], dim=1)  # the later prompt lands right after [CLS]
        want = vit.norm(vit.blocks[3:](h))
    assert got.shape == (2, 1 + 5 + 2 + 16, 48)
    assert torch.equal(got, want)


def test_pool_selects_top_k_by_cosine_similarity_not_dot_product():
    pool = PromptPool(pool_size=4, length=2, embed_dim=3, num_layers=2, prefix=True)
    with torch.no_grad():
        # key 0 has the largest dot product with the query but not the largest cosine
        pool.keys.copy_(torch.tensor([[10.0, 10.0, 0.0], [1.0, 0.1, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]))
    query = torch.tensor([[1.0, 0.0, 0.0], [-2.0, 1.0, 0.5]])
    indices, sim = pool.select(query, top_k=2)
    keys = pool.keys.detach()
    want_sim = torch.stack([torch.stack([q @ k / (q.norm() * k.norm()) for k in keys]) for q in query])
    torch.testing.assert_close(sim, want_sim)
    assert indices.tolist() == [[1, 0], [3, 2]]
    assert indices.tolist() == want_sim.argsort(dim=1, descending=True)[:, :2].tolist()
    # the selected entries' prompts
    chosen = pool(indices)
    assert chosen.shape == (2, 2, 2, 2, 2, 3)
    assert torch.equal(chosen[0, 0], pool.prompts[1])
    # the similarity carries the keys' gradient (for the pull loss), the indices none
    sim.gather(1, indices).sum().backward()
    assert pool.keys.grad is not None and pool.keys.grad[1].abs().sum() > 0
    with pytest.raises(ValueError):
        pool.select(query, top_k=5)


def test_prompt_pool_shapes():
    assert PromptPool(10, 5, 8).prompts.shape == (10, 1, 5, 8)
    assert PromptPool(10, 20, 8, num_layers=3, prefix=True).prompts.shape == (10, 3, 2, 20, 8)
    assert PromptPool(10, 5, 8, key_dim=4).keys.shape == (10, 4)


def test_backbone_gets_no_gradient_prompts_do_and_dropout_stays_off():
    vit = tiny_vit(proj_drop_rate=0.5, attn_drop_rate=0.5, drop_path_rate=0.5)
    pv = PromptedViT(vit)
    pv.train()
    assert pv.training and not vit.training and not any(m.training for m in vit.modules())
    assert not any(p.requires_grad for p in vit.parameters())
    prompt = torch.nn.Parameter(tokens(5, 48, seed=9))
    keys = torch.nn.Parameter(tokens(3, 48, seed=10))
    x = images()
    out = pv.forward_features(x, prompts={0: prompt}, prefixes={2: (keys, keys)})
    # eval mode kept: dropout / drop-path off, the pass is deterministic
    assert torch.equal(out, pv.forward_features(x, prompts={0: prompt}, prefixes={2: (keys, keys)}))
    out[:, 0].sum().backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    assert keys.grad is not None and keys.grad.abs().sum() > 0
    assert all(p.grad is None for p in vit.parameters())
    assert not pv.query(x).requires_grad


def test_unfrozen_vit_follows_train_mode():
    vit = tiny_vit()
    pv = PromptedViT(vit, freeze=False)
    pv.train()
    assert vit.training and all(p.requires_grad for p in vit.parameters())


def test_bad_blocks_and_shapes_raise():
    pv = PromptedViT(tiny_vit())
    with pytest.raises(ValueError, match="outside"):
        pv.forward_features(images(), prompts={5: torch.zeros(1, 48)})
    with pytest.raises(ValueError, match="prompt tokens"):
        pv.forward_features(images(), prompts={0: torch.zeros(3, 1, 48)})
    with pytest.raises(ValueError, match="class token"):
        PromptedViT(tiny_vit(class_token=False, global_pool="avg"))


def test_create_vit_loads_only_a_local_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        create_vit("vit_tiny_patch16_224", str(tmp_path / "missing.pth"), **TINY)
    source = tiny_vit()
    path = tmp_path / "tiny.pth"
    torch.save(source.state_dict(), path)
    loaded = create_vit("vit_tiny_patch16_224", str(path), **TINY)
    assert loaded.num_classes == 0
    for (name, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    fresh = create_vit("vit_tiny_patch16_224", None, **TINY)
    assert not torch.equal(fresh.pos_embed, loaded.pos_embed)


def test_build_prompted_vit_from_a_name_or_a_module():
    pv = build_prompted_vit("vit_tiny_patch16_224", vit_kwargs=TINY, project_prefix=False)
    assert pv.embed_dim == 48 and pv.depth == 5 and not pv.project_prefix
    vit = tiny_vit()
    assert build_prompted_vit(vit).vit is vit
    with pytest.raises(ValueError):
        build_prompted_vit(vit, vit_kwargs=TINY)
