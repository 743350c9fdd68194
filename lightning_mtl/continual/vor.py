"""Virtual outlier regularization (VOR) of a classifier head: the second half of OVOR.

At the end of each task the prompt (or whatever the module trains) is frozen, the features of the
task's samples are extracted once, and the head alone is trained on them with cross-entropy plus an
energy regularizer that keeps the energy of the task's samples low and that of *virtual outliers* high.
The outliers are synthesized without any data of other tasks (NPOS, Tao et al., ICLR 2023): on the unit
sphere of the L2-normalized features of each class, the samples farthest from their ``k``-th nearest
neighbour are the class's boundary points; Gaussian candidates around them are drawn and the
candidates farthest from the class are kept. Tightening the head's decision regions around each task's
classes is what reduces inter-task confusion in rehearsal-free class-incremental learning.

- :func:`knn_distance`, :func:`boundary_points`, :func:`sample_virtual_outliers`: the generator.
- :func:`energy`, :func:`vor_loss`: the regularizer.
- :class:`VirtualOutlierRegularization`: the callback that runs the head phase at each task end of a
  :class:`~lightning_mtl.continual.stream.SiBlurryStream`, for any
  :class:`~lightning_mtl.continual.base.ContinualModule` (OnePrompt, L2P, DualPrompt, MVP ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from lightning_mtl._distributed import gather_strided
from lightning_mtl._modes import eval_mode
from lightning_mtl.continual.base import mask_unseen

__all__ = [
    "VirtualOutlierRegularization",
    "VirtualOutliers",
    "boundary_points",
    "energy",
    "knn_distance",
    "sample_virtual_outliers",
    "vor_loss",
]

_STAT_NAMES = ("ce", "reg", "energy_id", "energy_ood")


# -- the generator ------------------------------------------------------------------------------------
def knn_distance(queries: Tensor, bank: Tensor, k: int, exclude_self: bool = False, chunk_size: int = 4096) -> Tensor:
    """Euclidean distance of each query to its ``k``-th nearest neighbour in ``bank``.

    .. math::
        d_k(q_i) = \\text{the } k\\text{-th smallest of } \\{\\lVert q_i - b_j \\rVert_2 : j \\ne i
        \\text{ if exclude\\_self}\\}

    (the ranking is that of faiss' ``IndexFlatL2`` of the official code, which returns squared distances).

    Args:
        queries: ``[M, D]``.
        bank: ``[N, D]``.
        k: neighbour rank, ``1 <= k <= N`` (``N - 1`` with ``exclude_self``).
        exclude_self: the queries ARE the bank (row ``i`` of both is the same point): leave each point
            out of its own neighbours.
        chunk_size: queries per distance block (bounds the ``chunk_size x N`` memory).

    Returns:
        ``[M]`` distances.

    Examples:
        >>> bank = torch.tensor([[0.0], [1.0], [3.0]])
        >>> knn_distance(bank, bank, k=1, exclude_self=True)
        tensor([1., 1., 2.])
    """
    if queries.dim() != 2 or bank.dim() != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(
            f"queries [M, D] and bank [N, D] must share D, got {tuple(queries.shape)} and {tuple(bank.shape)}"
        )
    if exclude_self and queries.shape[0] != bank.shape[0]:
        raise ValueError("exclude_self needs the queries to be the bank itself (same number of rows)")
    available = bank.shape[0] - (1 if exclude_self else 0)
    if not 1 <= k <= available:
        raise ValueError(f"k must be in 1 .. {available} for a bank of {bank.shape[0]} rows, got {k}")
    out = []
    for start in range(0, queries.shape[0], chunk_size):
        block = torch.cdist(queries[start : start + chunk_size], bank)
        if exclude_self:
            rows = torch.arange(block.shape[0], device=block.device)
            block[rows, rows + start] = math.inf
        out.append(block.kthvalue(k, dim=1).values)
    return torch.cat(out) if out else queries.new_zeros(0)


def boundary_points(features: Tensor, k: int = 50, num_boundary: int = 50) -> Tensor:
    """Indices of the boundary points of one class: the rows of ``features`` whose L2-normalized
    feature lies farthest from its ``k``-th nearest neighbour among the others.

    .. math::
        \\hat z_i = z_i / \\lVert z_i \\rVert_2, \\quad
        B = \\operatorname{top}_{\\text{num\\_boundary}}\\, i \\mapsto d_k(\\hat z_i)
        \\text{ over } \\{\\hat z_j\\}_{j \\ne i}

    ``k`` is clipped to ``N - 1`` and ``num_boundary`` to ``N`` for a class of ``N`` samples (a class
    with one sample is its own boundary point). The official code queries an index that holds the
    query itself, so its ``k``-th neighbour is the ``(k - 1)``-th other point; here a point is never
    its own neighbour.

    Args:
        features: ``[N, D]`` features of one class (raw; normalized here).
        k: neighbour rank of the distance (50 in OVOR).
        num_boundary: boundary points to return (50 in OVOR).

    Returns:
        ``[min(num_boundary, N)]`` long indices into ``features``, farthest first.
    """
    n = features.shape[0]
    if n == 0:
        raise ValueError("boundary_points needs at least one feature")
    if k < 1 or num_boundary < 1:
        raise ValueError(f"k and num_boundary must be positive, got {k} and {num_boundary}")
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=features.device)
    normed = F.normalize(features, dim=1)
    distance = knn_distance(normed, normed, min(k, n - 1), exclude_self=True)
    return distance.topk(min(num_boundary, n)).indices


class VirtualOutliers(NamedTuple):
    """What :func:`sample_virtual_outliers` returns."""

    outliers: Tensor  # [M, D] virtual outliers, in the space of the L2-normalized features
    sources: Tensor  # [M] long, index (into the class's features) of the boundary point each came from


def sample_virtual_outliers(
    features: Tensor,
    k: int = 50,
    num_boundary: int = 50,
    num_candidates: int = 600,
    cov: float = 0.1,
    num_outliers: int = 40,
    generator: torch.Generator | None = None,
) -> VirtualOutliers:
    """Virtual outliers of one class by non-parametric outlier synthesis (NPOS, as used by OVOR).

    .. math::
        c_{b,j} = \\hat z_b + \\sigma\\,\\epsilon_{b,j}, \\quad \\epsilon_{b,j} \\sim \\mathcal N(0, I),
        \\quad b \\in B, \\ j = 1 .. \\text{num\\_candidates}

    with :func:`boundary_points` ``B`` and ``sigma = cov``; of all candidates, the ``num_outliers`` with
    the largest distance to their ``k``-th nearest neighbour among the class's normalized features
    :math:`\\{\\hat z_i\\}` are kept.

    ``cov`` is a standard deviation despite its name: the official code multiplies standard normal
    offsets by it (variance ``cov ** 2``). Unlike the official code, the candidates are centred on the
    boundary points (it samples ``cov * N(0, I)`` around the origin, so its "outliers" are small vectors
    near the origin), and every boundary point draws its own offsets (it reuses one set of 600 for all).
    ``k`` is clipped to ``N`` (``N - 1`` for the boundary search) for a class of ``N`` samples.

    Args:
        features: ``[N, D]`` features of one class (raw; normalized here).
        k: neighbour rank of both k-NN distances (50).
        num_boundary: boundary points (50).
        num_candidates: candidates drawn around each boundary point (600).
        cov: standard deviation of the Gaussian offsets (0.1).
        num_outliers: candidates kept (40 per class).
        generator: random generator of the offsets (on ``features``' device).

    Returns:
        :class:`VirtualOutliers` ``(outliers [M, D], sources [M])``, ``M = min(num_outliers,
        num_candidates * |B|)``, farthest first.
    """
    if num_candidates < 1 or num_outliers < 1:
        raise ValueError(f"num_candidates and num_outliers must be positive, got {num_candidates} and {num_outliers}")
    if cov < 0:
        raise ValueError(f"cov must be non-negative, got {cov}")
    normed = F.normalize(features, dim=1)
    boundary = boundary_points(features, k, num_boundary)
    noise = torch.randn(
        (boundary.shape[0], num_candidates, features.shape[1]),
        generator=generator,
        device=features.device,
        dtype=normed.dtype,
    )
    candidates = (normed[boundary].unsqueeze(1) + cov * noise).reshape(-1, features.shape[1])
    sources = boundary.repeat_interleave(num_candidates)
    distance = knn_distance(candidates, normed, min(k, normed.shape[0]))
    keep = distance.topk(min(num_outliers, candidates.shape[0])).indices
    return VirtualOutliers(candidates[keep], sources[keep])


# -- the regularizer ----------------------------------------------------------------------------------
def energy(logits: Tensor) -> Tensor:
    """Free energy of the logits, ``s(z) = -log sum_c exp(z_c)`` over the last dimension (lower = more
    in-distribution; Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020).

    Masked columns (the dtype's minimum, see :func:`~lightning_mtl.continual.base.mask_unseen`) add
    nothing.

    Examples:
        >>> energy(torch.tensor([[0.0, 0.0]]))
        tensor([-0.6931])
    """
    return -torch.logsumexp(logits, dim=-1)


def vor_loss(
    logits_id: Tensor,
    logits_ood: Tensor,
    tau_id: float = -15.0,
    tau_ood: float = -3.0,
    lam: float = 0.1,
    delta: float = 1.0,
) -> Tensor:
    """Virtual outlier regularization: push in-distribution energies below ``tau_id`` and outlier
    energies above ``tau_ood``.

    .. math::
        L_{VOR} = \\lambda \\big( \\operatorname{mean}_i H(\\max(0, s(z_i) - \\tau_{id}))
        + \\operatorname{mean}_o H(\\max(0, \\tau_{ood} - s(z_o))) \\big)

    with :func:`energy` ``s`` and the Huber function ``H(x) = x^2 / 2`` for ``|x| < delta``, else
    ``delta (|x| - delta / 2)`` (``torch.nn.HuberLoss()`` against zero, mean reduction, as in the
    official code). An empty batch contributes 0. In the example both energies are ``-log 2``:
    ``H(1 - log 2) + H(log 2) = 0.0471 + 0.2402``.

    Args:
        logits_id: ``[B, C]`` logits of in-distribution samples (masked to the classes seen).
        logits_ood: ``[M, C]`` logits of virtual outliers (masked alike).
        tau_id: energy threshold of the in-distribution samples (-15).
        tau_ood: energy threshold of the outliers (-3).
        lam: weight of the regularizer (0.1).
        delta: Huber threshold (1, PyTorch's default).

    Examples:
        >>> vor_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 0.0]]), tau_id=-1.0, tau_ood=0.0, lam=1.0)
        tensor(0.2873)
    """

    def term(gap: Tensor) -> Tensor:
        if gap.numel() == 0:
            return gap.sum()
        return F.huber_loss(gap, torch.zeros_like(gap), delta=delta)

    id_gap = F.relu(energy(logits_id) - tau_id)
    ood_gap = F.relu(tau_ood - energy(logits_ood))
    return lam * (term(id_gap) + term(ood_gap))


# -- the callback -------------------------------------------------------------------------------------
class VirtualOutlierRegularization(pl.Callback):
    """Virtual outlier regularization of the head at each task end (Huang, Chen, Hsu, "OVOR: OnePrompt
    with Virtual Outlier Regularization for Rehearsal-Free Class-Incremental Learning", ICLR 2024).

    Works with any :class:`~lightning_mtl.continual.base.ContinualModule` (it needs ``features(x)`` and
    ``head``) trained on a :class:`~lightning_mtl.continual.stream.SiBlurryStream` (it needs
    ``schedule`` and ``task_dataset(task)``): OVOR is OnePrompt with this callback, and the regularizer
    applies unchanged to L2P, DualPrompt or MVP.

    After the training step that ends a task (``schedule[batch_idx].task_end``), the callback

    1. extracts the features of the task's stream samples (eval transform) with the module in eval mode,
       without gradients, under the precision plugin's forward context;
    2. trains only the head, for ``epochs`` passes over those cached features, with cross-entropy plus
       :func:`vor_loss`, both on logits masked to the classes seen so far. Each epoch draws fresh
       outliers (:func:`sample_virtual_outliers`, per class), shuffles samples and outliers, and pairs
       each batch of ``batch_size`` samples with an equal share of the outliers (as the official
       code, which also regenerates its outliers every epoch);
    3. restores every submodule's train/eval mode, the head's ``requires_grad`` flags and gradients.

    Which features the head reads: the official code computes the in-distribution logits from the raw
    features (what the head reads at inference) but builds its outliers in the space of the
    L2-normalized features and feeds them to the head as they are (norm about ``sqrt(1 + cov^2 D)``,
    2.9 for ``D = 768``), whatever the norm of the raw features: where the two scales differ, the head
    can meet (or miss) the outlier threshold through the norm alone and learns little about directions. Here
    the geometry stays on the unit sphere (boundary points and outlier selection, as in NPOS/OVOR), and
    each outlier is mapped back to the raw scale by the norm of the boundary point it came from,
    ``o_raw = ||z_b|| o`` (``rescale_outliers=True``; False reproduces the official scale mismatch):
    the head sees samples and outliers at the magnitude it sees at inference.

    Optimizer: the official run (``--epochs 0 40 10``) trains the head for the last 10 of 50 epochs
    with the Adam of the whole run (lr 1e-3, betas (0.9, 0.999), batch 128), whose per-epoch cosine
    schedule then runs from 0.30e-3 down to 0.02e-3. The module's optimizer belongs to its own loop
    here, so each head phase gets a fresh optimizer (default Adam, lr 3e-4) annealed with a per-epoch
    cosine to 0 over its ``epochs`` (``cosine=True``), which follows that tail.

    Generation is per class (NPOS' design; the official code pools the task's classes into one
    boundary search and keeps ``40 x classes`` outliers from the pooled candidates).

    Reproducibility: the outliers and the shuffles come from a ``torch.Generator`` on the module's
    device seeded with ``seed`` and the task index, so a task's head phase is the same whatever ran
    before it; the tasks already regularized are saved in :meth:`state_dict`, so a resumed run neither
    skips nor repeats one.

    DDP: each rank extracts the features of its share (``rank::world``) of the task's samples; the
    shares are gathered (:func:`~lightning_mtl._distributed.gather_strided`) back into the
    single-process order, so every rank generates the same outliers and trains the same head, and the
    head is broadcast from rank 0 at the end so it stays bit-identical. Sharded strategies (FSDP, DeepSpeed) are refused.

    Logs ``train/vor/ce``, ``train/vor/reg``, ``train/vor/energy_id``, ``train/vor/energy_ood`` (means
    over the last epoch of the head phase) at each task end.

    Horizon: the head phase's cosine spans its own ``epochs`` whatever the Trainer's length, so no
    Trainer setting can leave it stale. What the Trainer does decide is which task ends it reaches: at
    the start of training the callback warns, naming the setting to change, when the run stops before a
    task's end (``trainer.max_steps``, ``trainer.limit_train_batches``: that task and those after it get
    no head phase, and the head evaluated last is not regularized for their classes) or replays the
    stream (``trainer.max_epochs`` above 1: each task is regularized once, so the run ends on training
    that no head phase follows).

    Args:
        epochs: passes of the head phase per task (10, the official ``--epochs 0 40 10``).
        optimizer: optimizer factory for the head's parameters (default Adam, lr 3e-4).
        cosine: anneal the learning rate to 0 with a per-epoch cosine over the phase (``T_max = epochs``,
            the phase's own length; the Trainer's ``max_epochs`` does not enter it).
        batch_size: in-distribution features per head step (128).
        k: neighbour rank of the k-NN distances (50).
        num_boundary: boundary points per class (50).
        num_candidates: candidates per boundary point (600).
        cov: standard deviation of the candidates' Gaussian offsets (0.1).
        num_outliers: outliers kept per class (40).
        tau_id: energy threshold of the task's samples (-15).
        tau_ood: energy threshold of the outliers (-3).
        lam: weight of the regularizer (0.1).
        rescale_outliers: map the outliers to the raw feature scale (see above).
        feature_batch_size: samples per batch of the feature extraction.
        num_workers: loader workers of the extraction; None: the data module's ``num_workers`` (or 0).
        seed: seed of the outlier generator (combined with the task index).
    """

    def __init__(
        self,
        epochs: int = 10,
        optimizer: OptimizerCallable | None = None,
        cosine: bool = True,
        batch_size: int = 128,
        k: int = 50,
        num_boundary: int = 50,
        num_candidates: int = 600,
        cov: float = 0.1,
        num_outliers: int = 40,
        tau_id: float = -15.0,
        tau_ood: float = -3.0,
        lam: float = 0.1,
        rescale_outliers: bool = True,
        feature_batch_size: int = 256,
        num_workers: int | None = None,
        seed: int = 0,
    ) -> None:
        for name, value in (
            ("epochs", epochs),
            ("batch_size", batch_size),
            ("k", k),
            ("num_boundary", num_boundary),
            ("num_candidates", num_candidates),
            ("num_outliers", num_outliers),
            ("feature_batch_size", feature_batch_size),
        ):
            if value < 1:
                raise ValueError(f"VirtualOutlierRegularization: {name} must be positive, got {value}")
        if cov < 0 or lam < 0:
            raise ValueError(f"VirtualOutlierRegularization: cov and lam must be non-negative, got {cov} and {lam}")
        self.epochs = int(epochs)
        self.optimizer_factory = optimizer
        self.cosine = bool(cosine)
        self.batch_size = int(batch_size)
        self.k = int(k)
        self.num_boundary = int(num_boundary)
        self.num_candidates = int(num_candidates)
        self.cov = float(cov)
        self.num_outliers = int(num_outliers)
        self.tau_id = float(tau_id)
        self.tau_ood = float(tau_ood)
        self.lam = float(lam)
        self.rescale_outliers = bool(rescale_outliers)
        self.feature_batch_size = int(feature_batch_size)
        self.num_workers = num_workers
        self.seed = int(seed)
        self.done_tasks: set[int] = set()
        # per task: mean losses of the first and the last epoch of its head phase
        self.history: dict[int, dict[str, float]] = {}

    # -- Lightning hooks ------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if any(word in strategy for word in ("FSDP", "DeepSpeed", "ModelParallel")):
            raise ValueError(
                f"VirtualOutlierRegularization does not support strategy {strategy}: it trains the head "
                "outside the training step and needs the whole head on every rank; use strategy='ddp'"
            )
        if not callable(getattr(pl_module, "features", None)) or not hasattr(pl_module, "head"):
            raise ValueError(
                f"VirtualOutlierRegularization needs a module with features(x) and head (a ContinualModule), "
                f"got {type(pl_module).__name__}"
            )
        datamodule = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning's data connector
        has_stream = hasattr(datamodule, "schedule") and callable(getattr(datamodule, "task_dataset", None))
        if datamodule is None or not has_stream:
            raise ValueError(
                "VirtualOutlierRegularization needs a data module with `schedule` and `task_dataset(task)` "
                "(SiBlurryStream), passed as trainer.fit(..., datamodule=...)"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check_task_ends(trainer)

    def check_task_ends(self, trainer: pl.Trainer) -> None:
        """Warns when the Trainer's run does not end on the stream's last head phase: it stops before a
        task end (``max_steps`` or ``limit_train_batches`` shorter than the stream) or runs more than the
        stream's one epoch. Call once the training loader is set up (``on_train_start``)."""
        if trainer.fast_dev_run:  # type: ignore[attr-defined]  # set by Lightning's connector
            return
        ends: dict[int, int] = {}  # task -> the batch at which its head phase runs
        for index, step in enumerate(trainer.datamodule.schedule):  # type: ignore[attr-defined]  # set by Lightning's data connector
            if step.task_end:
                ends.setdefault(int(step.task), index)
        batches, key, value = trainer.num_training_batches, "trainer.limit_train_batches", trainer.limit_train_batches
        steps = trainer.max_steps
        if steps is not None and steps >= 0 and steps * trainer.accumulate_grad_batches < batches:
            batches, key, value = steps * trainer.accumulate_grad_batches, "trainer.max_steps", steps
        missed = sorted(task for task, index in ends.items() if index >= batches and task not in self.done_tasks)
        if missed and math.isfinite(batches):
            rank_zero_warn(
                f"VirtualOutlierRegularization: the Trainer runs {int(batches)} of the stream's "
                f"{len(trainer.datamodule.schedule)} training batches ({key}={value}) and stops before the end of "  # type: ignore[attr-defined]  # Lightning's data connector
                f"tasks {missed}: they get no head phase, so the head evaluated last is not regularized for the "
                f"classes trained since the last one. Set {key} to {-1 if key == 'trainer.max_steps' else 1.0} to run "
                "the whole stream (or shorten the stream itself)."
            )
        epochs = trainer.max_epochs
        replays = steps is None or steps < 0 or steps * trainer.accumulate_grad_batches > trainer.num_training_batches
        if not missed and (epochs is None or epochs < 0 or epochs > 1) and replays:
            rank_zero_warn(
                f"VirtualOutlierRegularization: the stream is one epoch but the Trainer may run more "
                f"(trainer.max_epochs={epochs}): each task gets one head phase, in the first epoch, so the run "
                "ends on training that no head phase follows. Set trainer.max_epochs to 1."
            )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        schedule = trainer.datamodule.schedule  # type: ignore[attr-defined]  # set by Lightning's data connector
        if batch_idx >= len(schedule):
            return
        step = schedule[batch_idx]
        if not step.task_end or int(step.task) in self.done_tasks:
            return
        stats = self.regularize(trainer, pl_module, int(step.task), int(step.num_seen))
        pl_module.log_dict(
            {f"train/vor/{name}": value for name, value in stats.items()}, on_step=True, on_epoch=False, batch_size=1
        )

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "done_tasks": sorted(self.done_tasks), "history": dict(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the saved seed wins: a resumed run reproduces the interrupted one
        self.seed = int(state_dict.get("seed", self.seed))
        self.done_tasks = {int(t) for t in state_dict.get("done_tasks", [])}
        self.history = {int(t): dict(v) for t, v in state_dict.get("history", {}).items()}

    # -- the head phase -------------------------------------------------------------------------------
    def regularize(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int, num_seen: int
    ) -> dict[str, float]:
        """Run the head phase of ``task`` (classes ``0 .. num_seen - 1`` seen); returns the mean losses
        of its last epoch (``ce``, ``reg``, ``energy_id``, ``energy_ood``)."""
        # setup checked that the module has a head (nn.Module attributes are typed Tensor | Module)
        head = cast(torch.nn.Module, pl_module.head)
        params = list(head.parameters())
        flags = [p.requires_grad for p in params]
        grads = [p.grad for p in params]
        try:
            with eval_mode(pl_module):
                features, labels = self.task_features(trainer, pl_module, task)
                if features.shape[0] == 0:
                    self.done_tasks.add(task)
                    return {}
                head.train()
                for p in params:
                    p.requires_grad_(True)
                    p.grad = None
                with torch.enable_grad():
                    stats = self._train_head(head, features, labels, num_seen, task)
                if trainer.world_size > 1:
                    # identical inputs and seeds already give identical heads; the broadcast guards
                    # against non-deterministic kernels
                    state = trainer.strategy.broadcast(
                        {n: t.detach().cpu() for n, t in head.state_dict().items()}, src=0
                    )
                    head.load_state_dict(state)
        finally:
            for p, flag, grad in zip(params, flags, grads):
                p.requires_grad_(flag)
                p.grad = grad
        self.done_tasks.add(task)
        self.history[task] = stats
        return {name: stats[f"last_{name}"] for name in _STAT_NAMES}

    @torch.no_grad()
    def task_features(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> tuple[Tensor, Tensor]:
        """Float32 features ``[N, D]`` and exposure labels ``[N]`` of the task's stream samples, in the
        data set's order, gathered over the ranks (each computes its ``rank::world`` share)."""
        datamodule = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning's data connector
        dataset = datamodule.task_dataset(task)
        n, world, rank = len(dataset), trainer.world_size, trainer.global_rank
        workers = self.num_workers if self.num_workers is not None else int(getattr(datamodule, "num_workers", 0) or 0)
        loader = DataLoader(
            Subset(dataset, range(rank, n, world)),
            batch_size=self.feature_batch_size,
            shuffle=False,
            num_workers=workers,
        )
        device = pl_module.device
        parts, label_parts = [], []
        for batch in loader:
            x, y = batch[0], batch[1]
            with trainer.precision_plugin.forward_context():
                # setup checked that the module has features(x) (nn.Module attributes are typed Tensor | Module)
                parts.append(cast(Callable[[Tensor], Tensor], pl_module.features)(x.to(device)).float())
            label_parts.append(torch.as_tensor(y).to(device=device, dtype=torch.long))
        width = parts[0].shape[1] if parts else 0
        features = torch.cat(parts) if parts else torch.zeros(0, width, device=device)
        labels = torch.cat(label_parts) if label_parts else torch.zeros(0, dtype=torch.long, device=device)
        return gather_strided(features, n), gather_strided(labels, n)

    def class_outliers(self, features: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
        """One draw of virtual outliers for every class in ``labels`` (sorted class order), at the raw
        feature scale when ``rescale_outliers``."""
        outliers = []
        for label in torch.unique(labels).tolist():
            own = features[labels == label]
            sampled = sample_virtual_outliers(
                own, self.k, self.num_boundary, self.num_candidates, self.cov, self.num_outliers, generator
            )
            points = sampled.outliers
            if self.rescale_outliers:
                points = points * own[sampled.sources].norm(dim=1, keepdim=True)
            outliers.append(points)
        return torch.cat(outliers)

    def _train_head(
        self, head: torch.nn.Module, features: Tensor, labels: Tensor, num_seen: int, task: int
    ) -> dict[str, float]:
        device = features.device
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed * 1_000_003 + task)
        params = list(head.parameters())
        optimizer = (
            torch.optim.Adam(params, lr=3e-4) if self.optimizer_factory is None else self.optimizer_factory(params)
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs) if self.cosine else None
        dtype = next(iter(params)).dtype if params else features.dtype
        n = features.shape[0]
        num_batches = -(-n // self.batch_size)
        stats: dict[str, float] = {}
        for epoch in range(self.epochs):
            outliers = self.class_outliers(features, labels, generator)
            order = torch.randperm(n, generator=generator, device=device)
            outliers = outliers[torch.randperm(outliers.shape[0], generator=generator, device=device)]
            totals = torch.zeros(4, device=device)
            for index, chunk in zip(order.split(self.batch_size), outliers.tensor_split(num_batches)):
                logits_id = mask_unseen(head(features[index].to(dtype)), num_seen).float()
                logits_ood = mask_unseen(head(chunk.to(dtype)), num_seen).float()
                ce = F.cross_entropy(logits_id, labels[index])
                reg = vor_loss(logits_id, logits_ood, self.tau_id, self.tau_ood, self.lam)
                optimizer.zero_grad(set_to_none=True)
                (ce + reg).backward()
                optimizer.step()
                with torch.no_grad():
                    totals += torch.stack(
                        [ce * len(index), reg * len(index), energy(logits_id).sum(), energy(logits_ood).sum()]
                    )
            if scheduler is not None:
                scheduler.step()
            if epoch in (0, self.epochs - 1):
                counts = torch.tensor([n, n, n, max(outliers.shape[0], 1)], device=device)
                means = dict(zip(_STAT_NAMES, (totals / counts).tolist()))
                for prefix, due in (("first", epoch == 0), ("last", epoch == self.epochs - 1)):
                    if due:
                        stats.update({f"{prefix}_{name}": value for name, value in means.items()})
        return stats
