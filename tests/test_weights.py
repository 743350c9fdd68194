"""lightning_mtl._weights.create_timm_model, the one loader of local timm weights, through both of its
callers (the shared encoders and the continual ViTs): weights load exactly, a misfit file and a missing
file are clear errors, and each caller keeps its own message."""

from __future__ import annotations

import pytest
import torch

from lightning_mtl._weights import WeightsMismatchError, create_timm_model
from lightning_mtl.architectures import timm_encoder
from lightning_mtl.continual.prompts import create_vit

MODEL = "test_resnet"  # timm's tiny test network: a classifier named fc, like resnet18


def _trained_weights() -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(1)
    model = timm.create_model(MODEL, pretrained=False, num_classes=7)  # with a classifier the encoder drops
    return model.state_dict()


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "safetensors"])
def test_a_local_file_loads_exactly_and_its_classifier_is_dropped(tmp_path, wrap):
    weights = _trained_weights()
    if wrap == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "weights.safetensors"
        save_file(weights, str(path))
    else:
        path = tmp_path / "weights.pth"
        torch.save(weights if wrap == "plain" else {wrap: weights, "epoch": 3}, path)
    encoder = timm_encoder(MODEL, str(path))
    loaded = encoder.state_dict()
    assert set(loaded) == {k for k in weights if not k.startswith("fc.")}
    assert all(torch.equal(loaded[k], weights[k]) for k in loaded)


def test_random_weights_without_a_file():
    torch.manual_seed(0)
    a = create_timm_model(MODEL, not_found="unused")
    torch.manual_seed(1)
    b = create_timm_model(MODEL, not_found="unused", pretrained=True)  # pretrained is ignored: no download
    assert a.num_classes == 0 and not torch.equal(a.conv1[0].weight, b.conv1[0].weight)


def test_a_file_that_does_not_fit_names_the_file_and_model(tmp_path):
    weights = _trained_weights()
    dropped = next(k for k in weights if k.endswith("conv1.weight"))
    del weights[dropped]
    path = tmp_path / "partial.pth"
    torch.save(weights, path)
    with pytest.raises(WeightsMismatchError, match=rf"partial.pth does not fit '{MODEL}'.*{dropped}"):
        timm_encoder(MODEL, str(path))
    assert issubclass(WeightsMismatchError, ValueError) and issubclass(WeightsMismatchError, RuntimeError)


def test_a_missing_file_keeps_each_callers_message(tmp_path):
    missing = tmp_path / "none.pth"
    message = rf"timm checkpoint for '{MODEL}' not found at .*none.pth: give a local weights file"
    with pytest.raises(FileNotFoundError, match=message):
        timm_encoder(MODEL, str(missing))
    with pytest.raises(FileNotFoundError, match=r"ViT weights not found at '.*none.pth'\. Nothing is downloaded"):
        create_vit("vit_tiny_patch16_224", str(missing), img_size=16, patch_size=4, depth=1)
    with pytest.raises(FileNotFoundError, match="^where is test_resnet$"):
        create_timm_model(MODEL, missing, not_found="where is {model_name}")


def test_a_misshapen_entry_is_a_mismatch(tmp_path):
    weights = _trained_weights()
    key = next(k for k in weights if k.endswith("conv1.weight"))
    weights[key] = weights[key][:1]
    path = tmp_path / "misshapen.pth"
    torch.save(weights, path)
    with pytest.raises(WeightsMismatchError, match=rf"(?s)misshapen.pth does not fit '{MODEL}'.*size mismatch"):
        timm_encoder(MODEL, str(path))


def test_the_vit_checkpoint_filter_resamples_position_embeddings(tmp_path):
    # timm's ViT filter runs as in timm's own loading: weights of a 16 px ViT load into a 32 px one
    tiny = dict(patch_size=4, embed_dim=48, depth=1, num_heads=3)
    small = create_vit("vit_tiny_patch16_224", img_size=16, **tiny)
    path = tmp_path / "vit16.pth"
    torch.save(small.state_dict(), path)
    large = create_vit("vit_tiny_patch16_224", str(path), img_size=32, **tiny)
    assert large.pos_embed.shape[1] == 1 + 8 * 8 and small.pos_embed.shape[1] == 1 + 4 * 4
    assert torch.equal(large.blocks[0].attn.qkv.weight, small.blocks[0].attn.qkv.weight)
    assert torch.equal(large.pos_embed[:, :1], small.pos_embed[:, :1])  # the class token's entry is kept
