"""NYUv2: 13-class segmentation, depth and surface normals from the preprocessed .npy files."""

from __future__ import annotations

from lightning_mtl.datamodules._dense_npy import KIND_DEPTH, KIND_NORMAL, KIND_SEGMENTATION, DenseNpyDataModule

__all__ = ["NYUv2"]

_ALL = {"segmentation": ("label", KIND_SEGMENTATION), "depth": ("depth", KIND_DEPTH), "normal": ("normal", KIND_NORMAL)}


class NYUv2(DenseNpyDataModule):
    """NYU Depth v2 for scene understanding: tasks ``segmentation`` (13 classes), ``depth``, ``normal``.

    Silberman, Hoiem, Kohli and Fergus, "Indoor Segmentation and Support Inference from RGBD Images",
    ECCV 2012; in the 288x384 preprocessed form of Liu, Johns and Davison, "End-to-End Multi-Task
    Learning with Attention" (MTAN), CVPR 2019, which LibMTL, Nash-MTL and F-MTL use: 795 training and
    654 validation images (the validation images are also the test set, as in those papers).

    Expected layout (``root``; download the preprocessed NYUv2 linked from the MTAN repository,
    https://github.com/lorenmt/mtan, and unpack it)::

        root/train/image/<i>.npy   [288, 384, 3] RGB in [0, 1]
        root/train/label/<i>.npy   [288, 384] class 0..12, -1 = void
        root/train/depth/<i>.npy   [288, 384, 1] depth in metres, 0 = missing
        root/train/normal/<i>.npy  [288, 384, 3] unit normals, 0 = missing
        root/val/...               the same

    Batches: ``(image [B, 3, H, W], {"segmentation": long [B, H, W], "depth": [B, 1, H, W],
    "normal": [B, 3, H, W]})``. Training samples are augmented as in MTAN / LibMTL (random scale-crop
    with zoom 1, 1.2 or 1.5, depth divided by the zoom; horizontal flip) unless ``augment=False``.

    Args:
        root: the folder holding ``train/`` and ``val/``.
        tasks: which of ``segmentation``, ``depth``, ``normal`` to load (all three by default).
        augment: augment the training split.
        image_size: resize every sample to ``(H, W)`` (default: keep the stored 288x384).
        batch_size: samples per batch (LibMTL and MTAN: 2 for SegNet / 8 for ResNet-50 runs).
        num_workers: DataLoader workers.
        seed: seed of the training order.
        pin_memory: forwarded to the DataLoaders.
    """

    dataset_name = "NYUv2"
    hint = "download the preprocessed NYUv2 (288x384) linked from https://github.com/lorenmt/mtan"
    default_shape = (288, 384)

    def __init__(
        self,
        root: str,
        tasks: list[str] | None = None,
        augment: bool = True,
        image_size: tuple[int, int] | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        names = list(_ALL) if tasks is None else list(tasks)
        unknown = [t for t in names if t not in _ALL]
        if unknown or not names:
            raise ValueError(f"NYUv2 tasks must be a non-empty subset of {list(_ALL)}, got {names}")
        super().__init__(root, {t: _ALL[t] for t in names}, 13, augment, image_size, batch_size, num_workers, seed,
                         pin_memory)  # fmt: skip
        self.save_hyperparameters()
