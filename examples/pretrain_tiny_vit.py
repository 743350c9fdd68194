"""Pretrain the tiny ViT of the embedded continual recipes, so that their frozen backbone means something.

The Si-Blurry methods assume a pretrained backbone (ViT-B/16 on ImageNet-21k, which has seen the classes
of CIFAR-100 and of ImageNet-R). The digits recipes' tiny ViT has no published weights, and on random
features every frozen-backbone method stays near chance. This script plays the part of that pretraining
on the embedded data: it trains the tiny ViT, supervised, on the **validation split** of the sklearn
digits (270 images that the stream never uses: the stream trains on the training split and evaluates
on the test split), then saves the backbone as a timm state dict and reports a linear probe of the
frozen features (fit on the training split, scored on the test split).

    python examples/pretrain_tiny_vit.py                     # about half a minute on a 2-core CPU
    python -m lightning_mtl fit --config configs/continual/data/digits.yaml \\
        --config configs/continual/methods/mvp.yaml \\
        --model.init_args.checkpoint_path tiny_vit_digits.pth
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from lightning_mtl.continual.prompts import create_vit
from lightning_mtl.continual.transforms import ViTEvalTransform, ViTTrainTransform
from lightning_mtl.datamodules.digits import Digits

# the digits recipes' backbone (configs/continual/data/digits.yaml, model.init_args.vit_kwargs)
VIT_KWARGS = dict(img_size=16, patch_size=4, depth=5)


def images(dataset, transform) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([transform(x) for x, _ in items]), torch.stack([torch.as_tensor(y) for _, y in items])


@torch.no_grad()
def features(vit: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    vit.eval()
    return torch.cat([vit(chunk) for chunk in x.split(256)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="tiny_vit_digits.pth", help="where to save the backbone's state dict")
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    # the same split (seed 0) and pixel scale as the recipes' source; the recipes' transforms
    data = Digits(image_size=16, channels=3, as_dict=False, normalize=False, seed=0)
    data.setup()
    augment, plain = ViTTrainTransform(image_size=16, padding=2, hflip=False), ViTEvalTransform(image_size=16)
    pool = [data.val_set[i] for i in range(len(data.val_set))]
    labels = torch.stack([torch.as_tensor(y) for _, y in pool])

    vit = create_vit("vit_tiny_patch16_224", **VIT_KWARGS)
    head = torch.nn.Linear(vit.num_features, 10)
    params = [*vit.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(pool) / 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.epochs * steps_per_epoch)
    for epoch in range(args.epochs):
        vit.train()
        x = torch.stack([augment(image) for image, _ in pool])  # fresh augmentation every epoch
        order = torch.randperm(len(pool))
        total = 0.0
        for index in order.split(64):
            loss = F.cross_entropy(head(vit(x[index])), labels[index], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(index)
        if (epoch + 1) % 25 == 0:
            print(f"epoch {epoch + 1:4d}  loss {total / len(pool):.3f}")

    torch.save(vit.state_dict(), args.out)
    train_x, train_y = images(data.train_set, plain)
    test_x, test_y = images(data.test_set, plain)
    probe = LogisticRegression(max_iter=3000).fit(features(vit, train_x).numpy(), train_y.numpy())
    accuracy = probe.score(features(vit, test_x).numpy(), test_y.numpy())
    print(f"saved {args.out}; linear probe of the frozen features: {100 * accuracy:.2f} % test accuracy")


if __name__ == "__main__":
    main()
