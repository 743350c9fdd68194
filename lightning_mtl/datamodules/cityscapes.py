"""Cityscapes: 7-class segmentation and depth from the preprocessed .npy files."""

from __future__ import annotations

from lightning_mtl.datamodules._dense_npy import KIND_DEPTH, KIND_SEGMENTATION, DenseNpyDataModule

__all__ = ["Cityscapes"]


class Cityscapes(DenseNpyDataModule):
    """Cityscapes for scene understanding: tasks ``segmentation`` (7 classes by default) and ``depth``.

    Cordts et al., "The Cityscapes Dataset for Semantic Urban Scene Understanding", CVPR 2016; in the
    128x256 preprocessed form of Liu, Johns and Davison (MTAN), CVPR 2019, used by Nash-MTL and F-MTL:
    2,975 training and 500 validation images (validation doubles as test), 7 coarse classes (or 19),
    inverse depth (disparity) with 0 where missing.

    Expected layout (``root``; download the preprocessed Cityscapes linked from
    https://github.com/lorenmt/mtan)::

        root/train/image/<i>.npy     [128, 256, 3] RGB in [0, 1]
        root/train/label_7/<i>.npy   [128, 256] class 0..6, -1 = void   (label_19/ for 19 classes)
        root/train/depth/<i>.npy     [128, 256, 1] inverse depth, 0 = missing
        root/val/...                 the same

    Batches: ``(image [B, 3, H, W], {"segmentation": long [B, H, W], "depth": [B, 1, H, W]})``.
    Training samples are augmented as in MTAN (random scale-crop, flip) unless ``augment=False``.

    Args:
        root: the folder holding ``train/`` and ``val/``.
        num_classes: 7 or 19 (reads ``label_7/`` or ``label_19/``).
        augment: augment the training split.
        image_size: resize every sample to ``(H, W)`` (default: keep the stored 128x256).
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        seed: seed of the training order.
        pin_memory: forwarded to the DataLoaders.
    """

    dataset_name = "Cityscapes"
    hint = "download the preprocessed Cityscapes (128x256) linked from https://github.com/lorenmt/mtan"
    default_shape = (128, 256)

    def __init__(
        self,
        root: str,
        num_classes: int = 7,
        augment: bool = True,
        image_size: tuple[int, int] | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        if num_classes not in (7, 19):
            raise ValueError(f"Cityscapes num_classes must be 7 or 19 (the preprocessed label sets), got {num_classes}")
        tasks = {"segmentation": (f"label_{num_classes}", KIND_SEGMENTATION), "depth": ("depth", KIND_DEPTH)}
        super().__init__(root, tasks, num_classes, augment, image_size, batch_size, num_workers, seed, pin_memory)
        self.save_hyperparameters()
