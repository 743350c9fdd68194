"""LEVI: a frozen pre-trained backbone's intermediate layers ensembled with a small model trained from scratch."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lightning_mtl._hparams import save_init_hyperparameters

__all__ = ["LEVI", "LEVIFeatureCache", "pool_view"]

Inputs = Tensor | Mapping[str, Tensor]


def pool_view(view: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """One layer's output as one vector per sample, in float32.

    ``[B, C, H, W]`` feature maps (CNNs, timm's ``forward_intermediates``) are averaged over the grid,
    ``[B, T, D]`` token states (Hugging Face hidden states) over the tokens the ``attention_mask`` keeps,
    ``[B, D]`` is kept; anything else is flattened.
    """
    view = view.float()
    if view.dim() == 4:
        return view.mean(dim=(2, 3))
    if view.dim() == 3:
        if attention_mask is None:
            return view.mean(dim=1)
        mask = attention_mask.to(view.dtype).unsqueeze(-1)
        return (view * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
    return view.flatten(1)


class _SmallCNN(nn.Sequential):
    """The default small model for images: two 3x3 conv layers and a 2x2 grid of averages (where a stroke is
    stays visible)."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )  # fmt: skip


class _BagOfTokens(nn.Module):
    """The default small model for token inputs: the mean of learned token embeddings over the kept tokens."""

    def __init__(self, vocab_size: int, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: Any) -> Tensor:
        return pool_view(self.embed(input_ids), attention_mask)


def _is_hf(model: nn.Module) -> bool:
    return hasattr(getattr(model, "config", None), "output_hidden_states")


def _build_backbone(
    backbone: nn.Module | None, timm_name: str | None, timm_kwargs: Mapping[str, Any] | None,
    hf_path: str | None, hf_config: Mapping[str, Any] | None, model_seed: int, weights: str | None,
) -> nn.Module:  # fmt: skip
    given = [name for name, value in (("backbone", backbone), ("timm_name", timm_name), ("hf_path", hf_path),
                                      ("hf_config", hf_config)) if value is not None]  # fmt: skip
    if len(given) != 1:
        raise ValueError(f"LEVI takes exactly one of backbone, timm_name, hf_path, hf_config; got {given or 'none'}")
    if timm_name is not None:
        from lightning_mtl._weights import create_timm_model

        not_found = "LEVI: backbone_weights {path} is not a file (nothing is downloaded for {model_name})"
        return create_timm_model(timm_name, weights, not_found=not_found, **dict(timm_kwargs or {}))
    if hf_path is not None or hf_config is not None:
        if weights is not None:
            raise ValueError("LEVI: a Hugging Face backbone reads its weights from hf_path, not backbone_weights")
        try:
            import transformers
        except ImportError as err:  # pragma: no cover - the extra is installed in CI
            raise ImportError("a Hugging Face backbone needs transformers: pip install 'lightning-mtl[text]'") from err
        if hf_path is not None:
            if not Path(hf_path).expanduser().is_dir():
                raise FileNotFoundError(f"LEVI: hf_path {hf_path} is not a local model folder (nothing is downloaded)")
            return transformers.AutoModel.from_pretrained(str(Path(hf_path).expanduser()))
        config = dict(hf_config or {})
        kind = config.pop("model_type")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model_seed)
            return transformers.AutoModel.from_config(transformers.AutoConfig.for_model(kind, **config))
    assert backbone is not None
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"LEVI: backbone_weights {path} is not a file")
        backbone.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return backbone


class LEVI(pl.LightningModule):
    """LEVI: a layer-wise ensemble of a frozen pre-trained model and a small model trained from scratch.

    Roh, Liu, Gui, Yuan, Tang, Whang, Liu, Bi, Hong, Chi and Zhao, "LEVI: Generalizable Fine-tuning via
    Layer-wise Ensemble of Different Views", ICML 2024 (arXiv 2402.04644). No official code was found.

    The pre-trained ``backbone`` stays fixed; chosen intermediate ``layers`` of it give one view each
    (pooled to a vector by :func:`pool_view`), a ``small_model`` trained from scratch on the same input gives
    another, and the adapting layers map the concatenation of all views to the prediction; the whole ensemble
    is trained with one task loss (cross-entropy) on that prediction::

        logits = adapt( [ norm(pool(h_l1(x))), ..., norm(pool(h_lk(x))), norm(small(x)) ] )
        loss   = cross_entropy(logits, y)

    What was verified and from where: the abstract (arXiv 2402.04644) says the pre-trained model is fixed
    and "adaptively ensembled layer-wise with a small task-specific model"; a third-party summary of the paper
    (themoonlight.io review) says the input of the adapting layers concatenates the intermediate outputs of the
    pre-trained model and the output of the small model; the sciencestack.ai summary says a shared loss is
    optimised across the intermediate representations and that the method works with a LoRA-tuned backbone.
    Not verified (the paper's Section 3 text could not be read here), so our choices: the adapting layers are
    a two-layer MLP (``adapter_hidden``; 0 = one linear layer), each view is average-pooled and standardised
    (LayerNorm without parameters, ``normalize_views``) before the concatenation, the default small model is
    a two-layer CNN for images (:class:`_SmallCNN`) or a bag of token embeddings for token inputs.

    Backbones: a timm model (``timm_name``, or any module with ``forward_intermediates``; ``layers`` are its
    block indices), a Hugging Face model (``hf_path`` / ``hf_config``; ``layers`` index ``hidden_states``,
    0 = embeddings; batches carry ``input_ids`` / ``attention_mask`` dicts), or any module (``layers`` are
    submodule names, read by forward hooks). ``backbone_weights`` loads a local state dict (timm: through
    timm's own reader).

    The frozen backbone runs without autograd and in eval mode all the time (BatchNorm statistics and dropout
    untouched, so it stays bit-identical); with ``freeze_backbone=False`` it trains too (the full fine-tuning
    baseline: ``use_small_model=False``, the last layer only). :class:`LEVIFeatureCache` skips its forward for
    inputs seen before. Under DDP each rank averages its own loss and DDP averages the gradients: the
    single-process update on the concatenated batch for equal per-rank batches. bf16-mixed / 16-mixed run
    the backbone and the heads under autocast; the views are pooled in float32.

    Batches: ``(inputs, y)`` or ``(inputs, {task: y})`` with one task. Logged: ``train/loss``, ``val/loss``,
    ``val/accuracy``, ``test/loss``, ``test/accuracy``.

    Args:
        num_classes: classes of the task.
        backbone: the pre-trained model itself (from Python, or a ``class_path`` in YAML).
        timm_name: instead: a timm model name, built offline (``timm_kwargs``; weights from
            ``backbone_weights``).
        timm_kwargs: further arguments of ``timm.create_model``.
        hf_path: instead: a local folder of a ``transformers`` model.
        hf_config: instead: config dict (with ``model_type``) of a randomly initialised one.
        model_seed: seed of an ``hf_config`` model's random weights.
        backbone_weights: local state-dict file loaded into ``backbone`` / the timm model.
        layers: the backbone's views: timm block indices, Hugging Face hidden-state indices, or submodule
            names of any other module.
        input_shape: shape of one tensor input (e.g. ``[1, 8, 8]``), to size the adapting layers; token
            inputs need none.
        small_model: the model trained from scratch; default as above.
        small_width: width of the default small model.
        use_small_model: False leaves the small model out (the linear-probe and full fine-tuning baselines).
        adapter_hidden: hidden width of the adapting layers; 0 makes them one linear layer.
        normalize_views: standardise each pooled view (LayerNorm without parameters) before concatenating.
        freeze_backbone: keep the backbone fixed (LEVI); False fine-tunes it too.
        optimizer: optimizer factory (default AdamW, lr 1e-3).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: nn.Module | None = None,
        timm_name: str | None = None,
        timm_kwargs: dict[str, Any] | None = None,
        hf_path: str | None = None,
        hf_config: dict[str, Any] | None = None,
        model_seed: int = 0,
        backbone_weights: str | None = None,
        layers: Sequence[int | str] = (-1,),
        input_shape: Sequence[int] | None = None,
        small_model: nn.Module | None = None,
        small_width: int = 16,
        use_small_model: bool = True,
        adapter_hidden: int = 128,
        normalize_views: bool = True,
        freeze_backbone: bool = True,
        optimizer: OptimizerCallable | None = None,
    ) -> None:
        super().__init__()
        save_init_hyperparameters(self, ["backbone", "small_model", "optimizer"], logger=False)
        if not layers:
            raise ValueError("LEVI needs at least one backbone layer in `layers`")
        self.num_classes = int(num_classes)
        self.backbone = _build_backbone(backbone, timm_name, timm_kwargs, hf_path, hf_config, model_seed,
                                        backbone_weights)  # fmt: skip
        self.layers = [layer if isinstance(layer, str) else int(layer) for layer in layers]
        self.kind = (
            "timm" if hasattr(self.backbone, "forward_intermediates") else "hf" if _is_hf(self.backbone) else "module"
        )
        self._check_layers()
        self.freeze_backbone = bool(freeze_backbone)
        if self.freeze_backbone:
            self.backbone.requires_grad_(False).eval()
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        if use_small_model and small_model is None:
            small_model = self._default_small_model(int(small_width))
        self.small_model = small_model if use_small_model else None
        self.normalize_views = bool(normalize_views)
        dims = self._view_dims()
        width = sum(dims)
        if adapter_hidden > 0:
            self.adapter: nn.Module = nn.Sequential(
                nn.Linear(width, adapter_hidden), nn.ReLU(), nn.Linear(adapter_hidden, self.num_classes)
            )
        else:
            self.adapter = nn.Linear(width, self.num_classes)
        self.view_dims = dims
        self.optimizer_factory = optimizer
        self.feature_cache: _FeatureStore | None = None  # set by LEVIFeatureCache, never saved

    # --- construction ---------------------------------------------------------------------------
    def _check_layers(self) -> None:
        if self.kind == "module":
            names = dict(self.backbone.named_modules())
            missing = [layer for layer in self.layers if not isinstance(layer, str) or layer not in names]
            if missing:
                raise ValueError(
                    f"LEVI: layers {missing} are not submodule names of the {type(self.backbone).__name__} "
                    f"backbone; some of its names: {[n for n in names if n][:12]}"
                )
        elif not all(isinstance(layer, int) for layer in self.layers):
            raise ValueError(f"LEVI: a {self.kind} backbone takes integer layer indices, got {self.layers}")

    def _example(self) -> Inputs:
        if self.kind == "hf":
            return {
                "input_ids": torch.zeros(2, 4, dtype=torch.long),
                "attention_mask": torch.ones(2, 4, dtype=torch.long),
            }
        if self.input_shape is None:
            raise ValueError(
                "LEVI needs input_shape (the shape of one input, e.g. [1, 8, 8]) to size its adapting layers"
            )
        return torch.zeros(2, *self.input_shape)

    def _default_small_model(self, width: int) -> nn.Module:
        if self.kind == "hf":
            backbone: Any = self.backbone
            return _BagOfTokens(int(backbone.config.vocab_size), width)
        shape = self._example().shape  # type: ignore[union-attr]
        if len(shape) == 4:
            return _SmallCNN(shape[1], width)
        return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(shape[1:]).prod()), width), nn.ReLU())

    @torch.no_grad()
    def _view_dims(self) -> list[int]:
        example = self._example()
        training = self.training
        self.eval()
        try:
            dims = [v.shape[1] for v in self._backbone_views(example)]
            if self.small_model is not None:
                dims.append(pool_view(self._small(example)).shape[1])
        finally:
            self.train(training)
        return dims

    # --- forward --------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> LEVI:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # the fixed model never leaves eval mode (BatchNorm statistics, dropout)
        return self

    def _raw_views(self, inputs: Inputs) -> list[Tensor]:
        backbone: Any = self.backbone
        if self.kind == "timm":
            return list(backbone.forward_intermediates(inputs, indices=self.layers, intermediates_only=True))
        if self.kind == "hf" and isinstance(inputs, Mapping):
            hidden = backbone(**inputs, output_hidden_states=True).hidden_states
            return [hidden[int(i)] for i in self.layers]
        captured: dict[str, Tensor] = {}
        modules = dict(backbone.named_modules())
        names = [str(name) for name in self.layers]  # submodule names (checked at construction)
        hooks = [modules[name].register_forward_hook(self._capture(captured, name)) for name in names]
        try:
            backbone(inputs)
        finally:
            for hook in hooks:
                hook.remove()
        return [captured[name] for name in names]

    @staticmethod
    def _capture(store: dict[str, Tensor], name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            output = output[0] if isinstance(output, (tuple, list)) else output
            # pooled at once: an in-place activation after this layer would overwrite what it returned
            store[name] = pool_view(output).clone()

        return hook

    def _backbone_views(self, inputs: Inputs) -> list[Tensor]:
        """The pooled float32 views of the backbone's layers (no autograd when it is frozen)."""
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            return [pool_view(v, mask) for v in self._raw_views(inputs)]

    def backbone_features(self, inputs: Inputs) -> Tensor:
        """The backbone's pooled views concatenated, ``[B, sum of their widths]`` (what the cache stores)."""
        return torch.cat(self._backbone_views(inputs), dim=1)

    def _small(self, inputs: Inputs) -> Tensor:
        assert self.small_model is not None
        return self.small_model(**inputs) if isinstance(inputs, Mapping) else self.small_model(inputs)

    def views(self, inputs: Inputs) -> list[Tensor]:
        """Every view before normalisation: the backbone's layers in order, then the small model."""
        if self.feature_cache is not None and self.freeze_backbone:
            features = self.feature_cache.lookup(inputs, self.backbone_features)
        else:
            features = self.backbone_features(inputs)
        views = list(features.split(self.view_dims[: len(self.layers)], dim=1))
        if self.small_model is not None:
            mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
            views.append(pool_view(self._small(inputs), mask))
        return views

    def forward(self, inputs: Inputs) -> Tensor:
        views = self.views(inputs)
        if self.normalize_views:
            views = [F.layer_norm(v, v.shape[1:]) for v in views]
        return self.adapter(torch.cat(views, dim=1))

    # --- Lightning ------------------------------------------------------------------------------
    @staticmethod
    def _split(batch: Any) -> tuple[Inputs, Tensor]:
        if isinstance(batch, Mapping):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            return inputs, batch["labels"]
        inputs, target = batch
        if isinstance(target, Mapping):
            if len(target) != 1:
                raise ValueError(f"LEVI trains one task; the batch carries {sorted(target)}")
            target = next(iter(target.values()))
        return inputs, target

    def _loss(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        inputs, target = self._split(batch)
        logits = self(inputs)
        return F.cross_entropy(logits.float(), target), logits, target

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, _, target = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(target))
        return loss

    def _evaluate(self, batch: Any, stage: str) -> None:
        loss, logits, target = self._loss(batch)
        accuracy = (logits.argmax(dim=1) == target).float().mean()
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=len(target))
        self.log(f"{stage}/accuracy", accuracy, sync_dist=True, prog_bar=stage == "val", batch_size=len(target))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            return torch.optim.AdamW(params, lr=1e-3)
        return self.optimizer_factory(params)


def _sample_keys(inputs: Inputs) -> list[bytes]:
    """One content hash per sample (its bytes, shape and dtype): equal inputs share a key, any change misses."""
    tensors = [inputs[k] for k in sorted(inputs)] if isinstance(inputs, Mapping) else [inputs]
    rows = [t.detach().contiguous().cpu().reshape(len(t), -1).view(torch.uint8).numpy() for t in tensors]
    header = repr([(tuple(t.shape[1:]), str(t.dtype)) for t in tensors]).encode()
    keys = []
    for i in range(len(rows[0])):
        digest = hashlib.blake2b(header, digest_size=16)
        for row in rows:
            digest.update(row[i].tobytes())
        keys.append(digest.digest())
    return keys


class _FeatureStore:
    """Backbone features by sample content hash, computed on a miss; counts hits and misses."""

    def __init__(self) -> None:
        self.rows: dict[bytes, Tensor] = {}
        self.hits = 0
        self.misses = 0

    def lookup(self, inputs: Inputs, compute: Callable[[Inputs], Tensor]) -> Tensor:
        keys = _sample_keys(inputs)
        if all(key in self.rows for key in keys):
            self.hits += len(keys)
            return torch.stack([self.rows[key] for key in keys])
        # a miss computes the whole batch, so a first pass is exactly the uncached one
        features = compute(inputs).detach()
        for key, row in zip(keys, features):
            if key in self.rows:
                self.hits += 1
            else:
                self.misses += 1
                self.rows[key] = row
        return features


class LEVIFeatureCache(pl.Callback):
    """Cache the frozen backbone's pooled features of :class:`LEVI`, so that inputs seen before skip its forward.

    Features are keyed by a hash of each sample's content, so changed data never reads stale features; the
    store as a whole belongs to a fingerprint of the backbone (its weights, the chosen layers, the pooling
    and the Trainer's precision), so a changed backbone starts empty. With ``directory`` the store is written
    there at the end of fitting (one file per fingerprint and rank) and read back by a later run with the same
    fingerprint. Keys are hashed on the CPU (a GPU batch is copied there first) and stored features stay
    on the module's device. Only for a frozen backbone and inputs that do not change between epochs: a second epoch
    that finds nothing cached (augmented inputs) switches the cache off with a warning, and
    ``freeze_backbone=False`` is refused at setup. A cached step and an uncached step are the same step:
    a batch with any new sample runs the backbone on the whole batch.

    Args:
        directory: folder for the store between runs; None keeps it in memory only.
    """

    def __init__(self, directory: str | None = None) -> None:
        self.directory = None if directory is None else Path(directory).expanduser()
        self.store = _FeatureStore()
        self.fingerprint = ""
        self.enabled = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, LEVI):
            raise TypeError(f"LEVIFeatureCache works with a LEVI module, got {type(pl_module).__name__}")
        if not pl_module.freeze_backbone:
            raise ValueError(
                "LEVIFeatureCache needs a fixed backbone, and LEVI(freeze_backbone=False) trains it: drop the "
                "callback or set freeze_backbone=True"
            )
        self.fingerprint = backbone_fingerprint(pl_module, str(trainer.precision))
        path = self._path(trainer)
        if path is not None and path.is_file() and not self.store.rows:
            saved = torch.load(path, map_location=pl_module.device, weights_only=True)
            self.store.rows = dict(zip((bytes(k) for k in saved["keys"].tolist()), saved["rows"].unbind(0)))
        pl_module.feature_cache = self.store if self.enabled else None

    def _path(self, trainer: pl.Trainer) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / f"levi_features_{self.fingerprint[:16]}_rank{trainer.global_rank}.pt"

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = (self.store.hits, self.store.misses)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        hits = self.store.hits - self._epoch_start[0]
        misses = self.store.misses - self._epoch_start[1]
        if self.enabled and trainer.current_epoch >= 1 and hits == 0 and misses > 0:
            warnings.warn(
                "LEVIFeatureCache: no training input of this epoch was seen before (augmented inputs?); "
                "the cache is switched off for the rest of the run",
                stacklevel=2,
            )
            self.enabled = False
            self.store.rows.clear()
            assert isinstance(pl_module, LEVI)
            pl_module.feature_cache = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = self._path(trainer)
        if path is None or not self.enabled or not self.store.rows:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = torch.tensor([list(k) for k in self.store.rows], dtype=torch.uint8)
        torch.save({"keys": keys, "rows": torch.stack(list(self.store.rows.values())).cpu()}, path)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if isinstance(pl_module, LEVI):
            pl_module.feature_cache = None


def backbone_fingerprint(module: LEVI, precision: str) -> str:
    """A hash of the backbone's weights and buffers, the chosen layers, the pooling and the precision."""
    digest = hashlib.blake2b(repr((module.kind, module.layers, precision)).encode(), digest_size=32)
    for name, tensor in module.backbone.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
