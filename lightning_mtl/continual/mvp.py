"""MVP: mask and visual prompt tuning for online class-incremental learning on Si-Blurry.

Moon, Park, Kim and Park, "Online Class Incremental Learning on Stochastic
Blurry Task Boundary via Mask and Visual Prompt Tuning", ICCV 2023.

MVP is DualPrompt (a frozen ViT, a shared g-prompt and a pool of e-prompts chosen per input by a
frozen query) with four additions, each a pure function on tensors here and a switch of :class:`MVP`:

- :func:`instance_logit_mask`: each e-prompt owns a row of learnable class weights; a sample's logits
  are multiplied by ``2 sigmoid`` of the row of the prompt it selected (``use_mask``);
- :func:`frequency_weighted_distance` / :func:`contrastive_prompt_loss`: keys that were selected often
  look farther away (selection spreads over the pool) and the keys are trained contrastively: the query
  is pulled to its key, the keys are pushed apart (``use_contrastive``);
- :func:`gradient_similarity_scores` / :func:`gradient_similarity_focal_loss`: a sample whose head
  gradient disagrees with its class's batch gradient (a minor or hard sample) gets a larger
  cross-entropy weight (``use_focal``); the per-sample head gradients come from one vectorized closed
  form (:func:`per_sample_head_grads`), not a loop over samples;
- :func:`adaptive_feature_scale`: features far from their class's head weight are enlarged before the
  head in the loss (``use_afs``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_mtl._distributed import differentiable_sum, distributed_world_size, sum_over_ranks
from lightning_mtl.continual.base import mask_unseen
from lightning_mtl.continual.dualprompt import DualPrompt

__all__ = [
    "MVP",
    "adaptive_feature_scale",
    "contrastive_prompt_loss",
    "focal_weights",
    "frequency_weighted_distance",
    "gradient_similarity_focal_loss",
    "gradient_similarity_scores",
    "instance_logit_mask",
    "key_distances",
    "masked_head_logits",
    "per_sample_head_grads",
    "select_by_frequency",
]


# -- instance-wise logit mask -------------------------------------------------------------------------
def instance_logit_mask(mask_params: Tensor, indices: Tensor) -> Tensor:
    """The multiplicative class mask of each sample: ``m_i = 2 sigmoid(M[k_i])``.

    Args:
        mask_params: ``[P, C]`` learnable mask logits ``M``, one row per e-prompt (MVP initializes them
            at -1, so a fresh row scales logits by ``2 sigmoid(-1) = 0.54``).
        indices: ``[B]`` index ``k_i`` of the prompt each sample selected (``[B, S]`` for ``S`` selected
            prompts: their rows are averaged first, as in the official code).

    Returns:
        ``[B, C]`` factors in ``(0, 2)``.
    """
    rows = mask_params[indices]
    if rows.dim() == 3:
        rows = rows.mean(dim=1)
    return 2.0 * torch.sigmoid(rows)


def masked_head_logits(
    features: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    logit_mask: Tensor | None = None,
    num_seen: Tensor | int | None = None,
) -> Tensor:
    """MVP's logits: ``z = (W f + b) * m`` (instance-wise mask, the bias included), then the classes not
    seen yet (``>= num_seen``) set to the dtype's minimum.

    Args:
        features: ``[B, D]`` features ``f``.
        weight: ``[C, D]`` head weight ``W``.
        bias: ``[C]`` head bias ``b`` or None.
        logit_mask: ``[B, C]`` factors ``m`` of :func:`instance_logit_mask`; None for no instance mask.
        num_seen: seen-class count (int, scalar or ``[B]``); None for no seen-class mask.

    Returns:
        ``[B, C]`` logits.
    """
    logits = F.linear(features, weight, bias)
    if logit_mask is not None:
        logits = logits * logit_mask
    if num_seen is not None:
        logits = mask_unseen(logits, num_seen)
    return logits


# -- prompt selection and the contrastive key loss ---------------------------------------------------
def key_distances(query: Tensor, keys: Tensor) -> Tensor:
    """Cosine distances ``d(q_i, k_j) = 1 - cos(q_i, k_j)``: ``[B, D]`` and ``[P, D]`` give ``[B, P]``."""
    return 1.0 - F.cosine_similarity(query.unsqueeze(1), keys.unsqueeze(0), dim=-1)


def frequency_weighted_distance(distance: Tensor, counts: Tensor) -> Tensor:
    """MVP's selection distance: ``d(q_i, k_j) * (n_j + 1)`` with ``n_j`` the times key ``j`` was selected
    in training so far, so that rarely used keys win ties and the whole pool gets used.

    Args:
        distance: ``[B, P]`` cosine distances of :func:`key_distances`.
        counts: ``[P]`` selection counts ``n``.
    """
    return distance * (counts.to(distance.dtype) + 1.0)


def select_by_frequency(query: Tensor, keys: Tensor, counts: Tensor | None = None) -> Tensor:
    """Index ``[B]`` of each query's key: ``argmin_j d(q_i, k_j) (n_j + 1)`` (plain ``argmin_j d`` when
    ``counts`` is None)."""
    distance = key_distances(query, keys)
    if counts is not None:
        distance = frequency_weighted_distance(distance, counts)
    return distance.argmin(dim=1)


def contrastive_prompt_loss(
    query: Tensor,
    keys: Tensor,
    indices: Tensor,
    counts: Tensor,
    eps: float = 1e-6,
    sync: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """MVP's contrastive key loss: the query is pulled to its selected key, the selected key is pushed
    away from every key of the pool, each term at the temperature ``tau_i = n_{k_i} + 1`` (the selection
    count of the sample's key before this step):

        P = 1/B sum_i exp(d(q_i, k_{k_i}) / tau_i)
        A = 1/(B P) sum_i sum_j exp(d(k_{k_i}, k_j) / tau_i)
        loss = -log(A / (P + A) + eps)

    with ``d`` the cosine distance. Lowering it lowers ``P`` (queries closer to their keys) and raises
    ``A`` (keys apart). ``A`` includes ``j = k_i`` (a constant ``exp(0) = 1``) as the official code does.

    The official code divides ``[B, 1, P]`` and ``[B]`` distances by ``[B, 1]`` temperatures, which
    broadcasts every sample's distances against every sample's temperature; here each sample keeps its own
    temperature. Both agree when the batch selects one key (one temperature).

    ``P`` and ``A`` are batch means inside a nonlinear function, so under DDP the mean of the ranks' losses
    is not the loss of the global batch. ``sync`` fixes that: it is applied to the ``[3]`` vector of the
    local sums of ``exp`` terms and the row count, and must return their sums over the ranks with
    gradients (:func:`~lightning_mtl._distributed.differentiable_sum`); every rank then computes ``P``,
    ``A`` and the loss of the global batch, and DDP's gradient average equals the gradient of the
    single-process loss on the concatenated batch.

    Args:
        query: ``[B, D]`` frozen queries (no gradient expected).
        keys: ``[P, D]`` learnable keys.
        indices: ``[B]`` selected key of each sample.
        counts: ``[P]`` selection counts before this step.
        eps: keeps the log finite.
        sync: differentiable sum over the DDP ranks, or None (one process: the plain batch means).

    Returns:
        scalar loss.
    """
    tau = counts.to(keys.dtype)[indices] + 1.0  # [B]
    selected = keys[indices]  # [B, D]
    positive = (1.0 - F.cosine_similarity(query, selected, dim=-1)) / tau
    between = key_distances(selected, keys) / tau.unsqueeze(1)  # [B, P]
    if sync is None:
        pos = positive.exp().mean()
        apart = between.exp().mean()
    else:
        local = torch.stack([positive.exp().sum(), between.exp().sum(), positive.new_tensor(float(len(indices)))])
        total_pos, total_apart, rows = sync(local).unbind()
        pos = total_pos / rows
        apart = total_apart / (rows * between.shape[1])
    return -(apart / (pos + apart) + eps).log()


# -- per-sample head gradients and the gradient-similarity focal loss -------------------------------
@torch.no_grad()
def _logit_grads(
    features: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    logit_mask: Tensor | None,
    num_seen: Tensor | int | None,
) -> Tensor:
    """``[B, C]`` coefficients ``c_i = (softmax(z_i) - e_{y_i}) * m_i`` with ``dCE_i / dW = c_i outer f_i``."""
    bias = None if bias is None else bias.detach()
    logits = masked_head_logits(features.detach(), weight.detach(), bias, logit_mask, num_seen)
    coeff = logits.float().softmax(dim=1) - F.one_hot(targets, logits.shape[1])
    if logit_mask is not None:
        coeff = coeff * logit_mask.detach()  # the chain factor of z = (W f + b) * m
    return coeff.to(features.dtype)


def per_sample_head_grads(
    features: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    logit_mask: Tensor | None = None,
    num_seen: Tensor | int | None = None,
    target_rows: bool = False,
) -> Tensor:
    """Gradients of each sample's cross-entropy with respect to the head weight, all in one pass.

    For ``z_i = (W f_i + b) * m_i`` (then seen-class masked), ``CE_i = -log softmax(z_i)_{y_i}`` has

        dCE_i / dW = ((p_i - e_{y_i}) * m_i) outer f_i,     p_i = softmax(z_i),

    (``m_i = 1`` without an instance mask; masked classes have ``p = 0`` and get no gradient). This is the
    closed form of what ``torch.func.vmap(torch.func.grad(...))`` or a loop of per-sample backward passes
    computes, at the cost of one batched outer product.

    Args:
        features: ``[B, D]`` features (treated as constants).
        weight: ``[C, D]`` head weight.
        bias: ``[C]`` head bias or None.
        targets: ``[B]`` labels.
        logit_mask: ``[B, C]`` instance mask factors or None.
        num_seen: seen-class count or None.
        target_rows: return only row ``y_i`` of each gradient, ``(p_{i,y_i} - 1) m_{i,y_i} f_i``.

    Returns:
        ``[B, C, D]`` gradients, or ``[B, D]`` with ``target_rows``.
    """
    features = features.detach()
    coeff = _logit_grads(features, weight, bias, targets, logit_mask, num_seen)
    if target_rows:
        return coeff.gather(1, targets.unsqueeze(1)) * features
    return coeff.unsqueeze(2) * features.unsqueeze(1)


def _per_sample_head_grads_loop(
    features: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    logit_mask: Tensor | None = None,
    num_seen: Tensor | int | None = None,
    target_rows: bool = False,
) -> Tensor:
    """Reference for :func:`per_sample_head_grads`: one autograd backward per sample (how the official
    code computes them; kept for tests and the benchmark)."""
    with torch.enable_grad():
        w = weight.detach().clone().requires_grad_(True)
        b = None if bias is None else bias.detach()
        mask = None if logit_mask is None else logit_mask.detach()
        losses = F.cross_entropy(masked_head_logits(features.detach(), w, b, mask, num_seen), targets, reduction="none")
        grads = []
        for i in range(len(targets)):
            (g,) = torch.autograd.grad(losses[i], w, retain_graph=i + 1 < len(targets))
            grads.append(g[targets[i]] if target_rows else g)
    return torch.stack(grads)


def gradient_similarity_scores(
    features: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    logit_mask: Tensor | None = None,
    num_seen: Tensor | int | None = None,
    sync: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """MVP's gradient dissimilarity ``s_i = 1 - cos(g_i, G_{y_i})`` of each sample to its class.

    ``g_i`` is row ``y_i`` of the head-weight gradient of sample ``i``'s cross-entropy and ``G_{y_i}``
    row ``y_i`` of the gradient of the batch-mean cross-entropy, ``G = 1/B sum_j dCE_j / dW``. Both come
    from :func:`per_sample_head_grads`' closed form: with ``c_i = (p_i - e_{y_i}) * m_i``,
    ``g_i = c_{i,y_i} f_i`` and ``G = 1/B C^T F``, one ``[C, B] x [B, D]`` product for the whole batch.

    Args:
        features: ``[B, D]`` (unscaled) features.
        weight, bias: the head.
        targets: ``[B]`` labels.
        logit_mask: ``[B, C]`` instance mask factors or None.
        num_seen: seen-class count or None.
        sync: applied to the summed ``[C, D]`` class gradients before use, e.g. a sum over DDP ranks so
            that ``G`` is the gradient of the whole global batch (the cosine ignores the ``1/B``).

    Returns:
        ``[B]`` scores in ``[0, 2]``, without gradient.
    """
    features = features.detach()
    coeff = _logit_grads(features, weight, bias, targets, logit_mask, num_seen)
    own = coeff.gather(1, targets.unsqueeze(1)) * features  # [B, D]
    class_grads = coeff.T @ features  # [C, D], B times the batch gradient
    if sync is not None:
        class_grads = sync(class_grads)
    return 1.0 - F.cosine_similarity(own, class_grads[targets], dim=1)


def focal_weights(scores: Tensor, alpha: float = 0.5, gamma: float = 2.0) -> Tensor:
    """``w_i = (1 - alpha) + alpha s_i^gamma``."""
    return (1.0 - alpha) + alpha * scores.pow(gamma)


def gradient_similarity_focal_loss(
    logits: Tensor, targets: Tensor, scores: Tensor, alpha: float = 0.5, gamma: float = 2.0
) -> Tensor:
    """MVP's gradient-similarity focal loss, per sample: ``1/B sum_i ((1 - alpha) + alpha s_i^gamma) CE_i``.

    The official code multiplies the batch-mean cross-entropy by the mean weight instead
    (``mean_i CE * mean_i w_i``), which gives every sample the same weight; the per-sample form is the
    paper's intent (METHODS.md).

    Args:
        logits: ``[B, C]`` (masked) logits.
        targets: ``[B]`` labels.
        scores: ``[B]`` dissimilarities of :func:`gradient_similarity_scores`.
        alpha, gamma: focal mixing weight and exponent.
    """
    ce = F.cross_entropy(logits, targets, reduction="none")
    return (focal_weights(scores.detach(), alpha, gamma).to(ce.dtype) * ce).mean()


# -- adaptive feature scaling ---------------------------------------------------------------------------
def adaptive_feature_scale(features: Tensor, weight: Tensor, targets: Tensor, margin: float = 0.5) -> Tensor:
    """MVP's adaptive feature scale ``1 / (1 - cos(W_{y_i}, f_i) + margin)``, without gradient.

    The loss feeds ``f_i`` times this scale to the head (``W f_i / (1 - cos + margin) + b``): a feature
    that points away from its class's weight is enlarged, so its logits and its gradient grow.

    Returns:
        ``[B, 1]`` factors, ready to multiply ``[B, D]`` features.
    """
    with torch.no_grad():
        cos = F.cosine_similarity(weight.detach()[targets], features.detach(), dim=1)
        return (1.0 / (1.0 - cos + margin)).unsqueeze(1)


def _differentiable_sum_over_ranks(value: Tensor) -> Tensor:
    """``value`` summed over the DDP ranks with gradients (itself outside a process group)."""
    return differentiable_sum(value, distributed_world_size() > 1)


# -- the module -------------------------------------------------------------------------------------------
class MVP(DualPrompt):
    """MVP (Moon, Park, Kim and Park, "Online Class Incremental Learning on
    Stochastic Blurry Task Boundary via Mask and Visual Prompt Tuning", ICCV 2023): DualPrompt with an
    instance-wise logit mask, contrastive visual prompt tuning, a gradient-similarity focal loss and
    adaptive feature scaling.

    Each input selects one e-prompt by its frozen [CLS] query (:class:`DualPrompt`). Then:

    - ``use_mask``: logits ``(W f + b) * 2 sigmoid(M_k)`` with ``M_k`` the learnable class row of the
      selected prompt ``k`` (:func:`instance_logit_mask`, rows start at -1), in training and evaluation;
    - ``use_contrastive``: selection by ``d(q, k_j) (n_j + 1)``, ``n_j`` the training selections of key
      ``j`` so far (:func:`select_by_frequency`, in training and evaluation as in the official code), and
      :func:`contrastive_prompt_loss` in place of DualPrompt's pull loss (weight ``pull_coef``);
    - ``use_focal``: cross-entropy weighted per sample by ``(1 - alpha) + alpha s_i^gamma``,
      ``s_i = 1 - cos(g_i, G_{y_i})`` of the per-sample and batch head gradients
      (:func:`gradient_similarity_scores`, from the unscaled features);
    - ``use_afs``: the loss's logits read ``f_i / (1 - cos(W_{y_i}, f_i) + margin)`` (detached scale;
      :func:`adaptive_feature_scale`); evaluation reads ``f_i``.

    With every switch off the loss is DualPrompt's. The selection counts are the buffer
    ``prompt_counts`` (saved with the weights). Under DDP every rank adds the counts of all ranks, the
    focal loss's class gradients ``G`` are summed over the ranks and the contrastive loss's batch means
    are taken over all ranks (with gradients), so the selection, the scores and the update match a
    single process on the concatenated batch (for equal per-rank batch sizes: DDP averages the ranks'
    per-sample means of the cross-entropy).

    Defaults (the paper's and the Si-Blurry code's): g-prompt length 5 at blocks 0-1, pool 10 of length 20
    at blocks 2-4, alpha 0.5, gamma 2, margin 0.5, Adam lr 5e-3 constant.

    ``backbone``, ``checkpoint_path``, ``vit_kwargs``, ``g_length``, ``g_layers``, ``e_length``,
    ``e_layers``, ``pool_size``, ``pull_coef`` and ``project_prefix`` are those of
    :class:`~lightning_mtl.continual.dualprompt.DualPrompt` (``pull_coef`` weighs the contrastive loss
    when ``use_contrastive``).

    Args:
        num_classes: classes of the stream.
        use_mask: instance-wise logit mask.
        use_contrastive: frequency-weighted selection and contrastive key loss.
        use_focal: gradient-similarity focal loss.
        use_afs: adaptive feature scaling.
        alpha: focal mixing weight.
        gamma: focal exponent.
        margin: adaptive feature scaling margin.
        mask_init: initial value of the mask logits (``2 sigmoid(-1) = 0.54``).
        optimizer: optimizer factory (default Adam, lr 5e-3).
        lr_scheduler: optional scheduler factory.
    """

    prompt_counts: Tensor  # a buffer, registered in __init__ (declared here for the type checker)
    head: nn.Linear

    def __init__(
        self,
        num_classes: int,
        backbone: str | nn.Module = "vit_base_patch16_224",
        checkpoint_path: str | None = None,
        vit_kwargs: dict[str, Any] | None = None,
        g_length: int = 5,
        g_layers: Sequence[int] = (0, 1),
        e_length: int = 20,
        e_layers: Sequence[int] = (2, 3, 4),
        pool_size: int = 10,
        pull_coef: float = 1.0,
        project_prefix: bool = True,
        use_mask: bool = True,
        use_contrastive: bool = True,
        use_focal: bool = True,
        use_afs: bool = True,
        alpha: float = 0.5,
        gamma: float = 2.0,
        margin: float = 0.5,
        mask_init: float = -1.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(
            num_classes,
            backbone=backbone,
            checkpoint_path=checkpoint_path,
            vit_kwargs=vit_kwargs,
            g_length=g_length,
            g_layers=g_layers,
            e_length=e_length,
            e_layers=e_layers,
            pool_size=pool_size,
            pull_coef=pull_coef,
            project_prefix=project_prefix,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
        )
        if self.e_pool is None and (use_mask or use_contrastive):
            raise ValueError("use_mask and use_contrastive need the e-prompt pool: set e_length > 0 and e_layers")
        if not 0.0 <= alpha <= 1.0 or gamma < 0 or margin <= 0:
            raise ValueError(f"need 0 <= alpha <= 1, gamma >= 0, margin > 0; got {alpha}, {gamma}, {margin}")
        self.use_mask, self.use_contrastive = bool(use_mask), bool(use_contrastive)
        self.use_focal, self.use_afs = bool(use_focal), bool(use_afs)
        self.alpha, self.gamma, self.margin = float(alpha), float(gamma), float(margin)
        pool = self.e_pool.pool_size if self.e_pool is not None else 1
        # created without the random generator: an MVP and a DualPrompt built after the same seed share
        # their prompts, keys and head
        self.logit_mask = nn.Parameter(torch.full((pool, num_classes), float(mask_init)), requires_grad=self.use_mask)
        self.register_buffer("prompt_counts", torch.zeros(pool, dtype=torch.long))

    # -- selection ----------------------------------------------------------------------------------
    def select_prompts(self, query: Tensor) -> tuple[Tensor, Tensor]:
        """DualPrompt's nearest key, or with ``use_contrastive`` the nearest after weighting each key's
        distance by its selection count plus one."""
        if not self.use_contrastive:
            return super().select_prompts(query)
        assert self.e_pool is not None
        similarity = self.e_pool.similarity(query)
        distance = frequency_weighted_distance(1.0 - similarity.detach(), self.prompt_counts)
        return distance.argmin(dim=1), similarity

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` of every class (seen-class mask not applied), times the selected
        prompt's class mask with ``use_mask``."""
        if self.e_pool is None:
            return self.head(self.prompted_features(x, None))
        indices, _ = self.select_prompts(self.vit.query(x))
        logit_mask = instance_logit_mask(self.logit_mask, indices) if self.use_mask else None
        return masked_head_logits(self.prompted_features(x, indices), self.head.weight, self.head.bias, logit_mask)

    # -- loss -------------------------------------------------------------------------------------
    def training_loss(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        x, y, num_seen = batch.x, batch.y, batch.num_seen
        weight, bias = self.head.weight, self.head.bias
        if self.e_pool is None:
            query = indices = similarity = None
            features = self.prompted_features(x, None)
        else:
            query = self.vit.query(x)
            indices, similarity = self.select_prompts(query)
            features = self.prompted_features(x, indices)
        # use_mask implies the e-prompt pool (checked in __init__), so indices are there
        logit_mask = instance_logit_mask(self.logit_mask, indices) if self.use_mask and indices is not None else None
        # the logits of the model (accuracy); the loss may read scaled features
        logits = masked_head_logits(features, weight, bias, logit_mask, num_seen)
        extras: dict[str, Tensor] = {"logits": logits}
        loss_logits = logits
        if self.use_afs:
            scale = adaptive_feature_scale(features, weight, y, self.margin)
            loss_logits = masked_head_logits(features * scale, weight, bias, logit_mask, num_seen)
            extras["afs_scale"] = scale.mean()
        if self.use_focal:
            scores = gradient_similarity_scores(features, weight, bias, y, logit_mask, num_seen, sync=sum_over_ranks)
            loss = gradient_similarity_focal_loss(loss_logits, y, scores, self.alpha, self.gamma)
            extras["focal_score"] = scores.mean()
        else:
            loss = F.cross_entropy(loss_logits, y)
        extras["ce"] = loss.detach()
        if indices is not None:
            assert self.e_pool is not None and query is not None and similarity is not None
            if self.use_contrastive:
                key_loss = contrastive_prompt_loss(
                    query, self.e_pool.keys, indices, self.prompt_counts, sync=_differentiable_sum_over_ranks
                )
                extras["contrastive"] = key_loss.detach()
            else:
                key_loss = self.pull_loss(indices, similarity)
                extras["pull"] = key_loss.detach()
            loss = loss + self.pull_coef * key_loss
            # counted after the loss: this step's temperatures use the counts before it
            with torch.no_grad():
                self.prompt_counts += sum_over_ranks(torch.bincount(indices, minlength=len(self.prompt_counts)))
        return loss, extras
