"""Adaptive Regularization of Labels (ALR): the loss, as a drop-in ``nn.Module``."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from alr import distributed
from alr.methods.supervised import Criterion, RunFacts

if TYPE_CHECKING:
    from alr.distributed import World

KEY = "method.module.criterion"  # where the config sets ALRLoss's arguments: errors name the key there
NORMALISATIONS = ("mean", "sum", "class_mean")
TEACH = ("all", "misclassified", "correct")
S_UPDATES = ("gradient", "running_mean")
WEIGHTS = ("one_minus_acc", "constant", "ramp")
S_INITS = ("zeros", "normal")
S_INIT_STD = 0.01  # s_init=normal: a small symmetry-breaking draw, every residual label still near uniform


def residual_index(targets: Tensor, num_classes: int) -> Tensor:
    """Column indices of each row's non-target classes, in class order: shape ``B×(K−1)``.

    Column ``j`` of a residual row for label ``k`` is class ``j`` if ``j < k``, else ``j + 1``
    (docs/deviations.md#alrs-loss). Built per batch, never as a K×K matrix.
    """
    cols = torch.arange(num_classes - 1, device=targets.device)
    return cols + (cols >= targets.unsqueeze(1))  # int64 + bool: one kernel, no conversion pass


def residual_matrix(rows: Tensor) -> Tensor:
    """``softmax`` of each row of a ``K×(K−1)`` matrix (ALR's ``S``, LS++'s ``C``), detached, in float32 and placed
    as a K×K matrix with a zero diagonal: row k = how class k's mass spreads over the other classes."""
    K = rows.shape[0]
    q = torch.softmax(rows.detach().float(), dim=1)
    return q.new_zeros(K, K).scatter_(1, residual_index(torch.arange(K, device=q.device), K), q)


def alr_terms_reference(
    logits: Tensor,
    S: Tensor,
    targets: Tensor,
    label_smoothing: float = 0.0,
    teach: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(L_hard, L_res, L_upd)`` written as plain autograd ops, straight from eq. 3–5 (docs/deviations.md#alrs-loss).

    The definition :class:`ALRLoss`'s fused path is tested against (values and gradients) and
    benchmarked beside (``bench/bench_loss.py``); not used for training. ``teach`` (``B``, 0 or 1) keeps
    only its rows in ``L_upd``, still divided by the batch size (``teach`` of :class:`ALRLoss`).
    """
    l_hard = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    log_p_res = torch.log_softmax(logits.gather(1, residual_index(targets, logits.shape[1])), dim=1)
    log_q_res = torch.log_softmax(S[targets], dim=1)
    l_res = -(log_q_res.detach().exp() * log_p_res).sum(dim=1).mean()
    if teach is None:
        l_upd = -(log_p_res.detach().exp() * log_q_res).sum(dim=1).mean()
    else:
        l_upd = -(log_p_res.detach().exp() * log_q_res).sum(dim=1).mul(teach).sum() / len(targets)
    return l_hard, l_res, l_upd


class _ALRFunction(torch.autograd.Function):
    """``L_hard + w·L_res + L_upd`` in one node, its backward the closed form of eq. 7–8.

    Plain autograd (:func:`alr_terms_reference`) measures about 14× a fused cross entropy at K=1000:
    two more softmaxes, a gather and an index whose backward passes each build their own zero
    tensors, and a dozen small nodes. Here one log-softmax of ``z`` serves ``L_hard`` and the backward
    (``p = exp(log_p)``); ``p_res − q_res`` is kept from the forward; the gradients are written
    directly:

    * ``∂L/∂z = c_h·(p − (1−ε)·onehot(y) − ε/K) + w·c_r·(p_res − q_res)`` at the non-target columns,
    * ``∂L/∂S[k] = c_s·Σ_{i: y_i=k} m_i·(q_res_i − p_res_i)``, both divided by B,

    with ``scale = (c_h, c_r, c_u, c_s)``, ``c_s = c_u·s_lr_multiplier``, and ``m`` the rows that teach ``S``
    (``teach``, a ``B`` mask of 0 and 1; ``None``: every row, the default's one dot product). ``L_upd`` is
    ``c_u·Σ_i m_i·CE(p̂_res_i, q_res_i) / B``.

    ``p_res`` is the ``log_softmax`` of the residual logits themselves, not ``p_j / (1 − p_y)``: the
    latter loses ``1 − p_y`` to rounding once ``p_y`` is within float32's epsilon of 1.
    Returns the loss and the three terms (``c·L/B`` each, not differentiable). The backward is
    first-order only (``once_differentiable``): training never differentiates it again.
    """

    @staticmethod
    def forward(ctx, z, S, targets, w, eps, scale, teach):
        B, K = z.shape
        c_hard, c_res, c_upd, _ = scale
        log_p = torch.log_softmax(z, dim=1)
        l_hard = log_p.gather(1, targets.unsqueeze(1)).sum().neg()
        if eps:
            l_hard = (1.0 - eps) * l_hard - (eps / K) * log_p.sum()
        # Residual column j is class j before the target, class j + 1 from it on (residual_index):
        # two shifted views and a mask instead of an int64 index, a gather and its scatter.
        before = torch.arange(K - 1, device=z.device) < targets.unsqueeze(1)
        log_p_res = torch.log_softmax(torch.where(before, z[:, :-1], z[:, 1:]), dim=1)
        log_q_res = torch.log_softmax(S.index_select(0, targets), dim=1)
        p_res, q_res = log_p_res.exp(), log_q_res.exp()
        l_res = torch.dot(q_res.view(-1), log_p_res.view(-1)).neg()
        if teach is None:
            l_upd = torch.dot(p_res.view(-1), log_q_res.view(-1)).neg()
        else:
            l_upd = torch.dot((p_res * log_q_res).sum(dim=1), teach).neg()
        terms = torch.stack([l_hard * (c_hard / B), l_res * (c_res / B), l_upd * (c_upd / B)])
        loss = terms[0] + w * terms[1] + terms[2]
        ctx.save_for_backward(log_p, targets, before, p_res.sub_(q_res), w, teach)
        ctx.eps, ctx.scale = eps, scale
        ctx.mark_non_differentiable(terms)
        return loss, terms

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_terms):
        log_p, targets, before, d_res, w, teach = ctx.saved_tensors
        eps, (c_hard, c_res, _, c_s) = ctx.eps, ctx.scale
        B, K = log_p.shape
        g = grad_loss / B
        grad_z = grad_S = None
        if ctx.needs_input_grad[0]:
            grad_z = log_p.exp()
            if eps:
                grad_z.sub_(eps / K)
            grad_z.scatter_add_(1, targets.unsqueeze(1), grad_z.new_full((B, 1), eps - 1.0))
            if c_hard != 1.0:
                grad_z.mul_(c_hard)
            r = d_res * (w * c_res)
            grad_z[:, :-1] += torch.where(before, r, 0.0)
            grad_z[:, 1:] += torch.where(before, 0.0, r)
            grad_z.mul_(g)
        if ctx.needs_input_grad[1]:
            d_upd = d_res if teach is None else d_res * teach.unsqueeze(1)
            grad_S = d_res.new_zeros(K, K - 1).index_add_(0, targets, d_upd * (g * -c_s))
        return grad_z, grad_S, None, None, None, None, None


def _choice(key: str, value: object, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{KEY}.{key} must be one of {', '.join(options)}; got {value!r}")
    return value


def _number(key: str, value: object, what: str, ok) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{KEY}.{key} must be {what}; got {value!r}")
    return float(value)


class ALRLoss(Criterion):
    r"""Adaptive label regularization (Ding et al., "Adaptive Regularization of Labels", §3.2).

    ``loss = criterion(logits, targets)`` returns

    .. math:: L = L_{hard} + w\,L_{res} + L_{upd}, \qquad w = 1 - acc_{train}

    * ``S`` (``K×(K−1)``, zeros at start, an ``nn.Parameter``) is the residual correlation
      matrix, eq. 3; ``q_res = softmax(S[y])`` is the residual label.
    * ``z_res`` is each row of the logits with its ground-truth column removed, the other
      columns kept in class order; ``p_res = softmax(z_res)``.
    * ``L_upd = −1/(K−1)·Σ p̂_res · log q_res`` (eq. 4): trains ``S`` only (``p̂`` detached).
    * ``L_res = −1/(K−1)·Σ q̂_res · log p_res`` (eq. 5): trains the backbone only (``q̂`` detached).
    * ``L_hard = CE(z, y)``, label-smoothed with ``label_smoothing`` for ALR-S.

    Choices where the paper is silent (also in docs/deviations.md):

    * **Normalisation** (``normalisation``). Eq. 4–5 print ``1/(K−1)`` in front of ``L_res`` and ``L_upd``;
      §3 defines the cross entropy (and so §3.1's ``L_hard``) with ``1/K``; the gradients of eq. 7–8 print no
      factor at all. ``mean`` (default): eq. 4–5 as printed, ``L_res`` and ``L_upd`` averaged over the K−1
      residual classes (a mean over the ``B×(K−1)`` elements), ``L_hard`` the usual cross entropy (``1/K``
      there would divide the effective learning rate by K, which the paper's baselines rule out). ``sum``:
      every term a plain cross entropy (sum over classes, mean over the batch), the residual pull (K−1)×
      stronger (``method=alr_sum``). ``class_mean``: the literal ``1/K`` on ``L_hard`` too. Why ``mean`` is
      the default, and what the summed form does on Fashion-MNIST: docs/deviations.md#alrs-loss.
    * **acc_train** (the weight of §3.2, "approximately" ``1 − acc_train``): the running top-1
      accuracy of this epoch's training batches *including the current one*, from the same logits,
      reset by :meth:`reset_epoch`. ``acc_source="batch"`` uses the current batch alone. The
      counters are device tensors, so no host synchronisation happens per step. Under several
      processes the counts are summed over them (the global batch), so ``w`` is the same on every rank.
    * **Precision.** All of the loss is computed in float32 with autocast disabled, whatever the
      logits' dtype, so fp16/bf16 training cannot overflow inside the softmaxes.
    * ``S`` is trained by the run's own optimizer and schedule (its own parameter group; the
      trainer gives it weight decay 0 unless configured), as the paper trains it jointly.

    Switches for what the paper leaves open (each a key under ``method.module.criterion``; the defaults
    are the reading above, and, for each normalisation, give bit for bit the loss the suite computed before
    the switches existed):

    * ``teach`` — which samples teach ``S``: ``all`` (default), ``misclassified`` or ``correct`` (by the
      current logits' argmax, the same one ``acc_train`` counts). Only those rows enter ``L_upd`` and
      ``S``'s gradient (or, with ``s_update=running_mean``, the running mean); ``L_res`` and ``L_hard``
      keep every row. ``L_upd`` stays divided by the batch size B, not by the number of teaching rows:
      ``teach=all`` is then the default exactly, a batch without a teaching row gives 0 (no division by
      zero), and one misclassified sample late in training moves ``S`` by one sample's share instead of a
      whole batch's, so ``S``'s step shrinks as fewer samples teach.
    * ``s_update`` — ``gradient`` (default): ``L_upd`` trains ``S`` through the run's optimizer.
      ``running_mean``: ``S`` is not trained by the optimizer (a parameter with ``requires_grad=False``,
      so the trainer leaves it out of its parameter groups; ``L_upd`` is still logged). During an epoch each
      rank adds the detached ``p_res`` of its teaching samples to per-class sums (``K×(K−1)``) and counts
      (``K``), the non-persistent buffers of :meth:`partial_sums`; :meth:`end_epoch` sums them over the
      ranks and sets ``S[k] := log(mean p_res of class k)`` (the mean clamped to float32's smallest
      normal number, so ``log`` stays finite), so that ``softmax(S[k])`` is that mean: an OLS-style
      residual label. A class without a teaching sample that epoch keeps its row. In the first epoch
      ``q_res`` is what ``s_init`` gives (uniform for zeros).
    * ``weight`` — the residual weight ``w``: ``one_minus_acc`` (default, ``1 − acc_train``),
      ``constant`` (``weight_value``, a number ≥ 0, required then and refused otherwise; OLS uses 0.5), or
      ``ramp``: linear from 0 at the run's first training step to 1 at its last
      (``epochs × steps_per_epoch`` from :meth:`setup`). The ramp's step counter is a persistent int64
      device buffer (``ramp_step``, only in this mode, so the default state is unchanged), so a
      mid-epoch resume continues it and no step reads a tensor back. With ``constant`` and ``ramp``
      the accuracy counters are not kept (nor all-reduced), and ``acc_source`` has no effect.
    * ``s_lr_multiplier`` (default 1) — ``S``'s learning rate as a multiple of the run's: set as
      ``S.lr_multiplier``, which the trainer reads to give ``S`` a parameter group whose learning rate is
      the run's times it, under every schedule (the scheduler scales each group's own base rate) and every
      optimizer (SGD or Adam alike). Refused with ``s_update=running_mean``, where no optimizer trains ``S``.
    * ``s_init`` — ``zeros`` (default, §3.2 "Initialization") or ``normal``: ``N(0, 0.01²)`` drawn in
      :meth:`setup` from a CPU generator seeded with the run's seed, so every rank draws the same ``S``
      (a resumed run then loads its checkpoint's ``S`` over it).

    ``weight=ramp`` and ``s_init=normal`` need :meth:`setup` (the trainer calls it) before the first step.

    Speed: the three terms and their gradients are one autograd node whose backward writes the
    closed forms of eq. 7–8 (:class:`_ALRFunction`); tests hold it to the plain autograd
    definition :func:`alr_terms_reference`. No K×K matrix is built per step; ``S``'s gradient is
    the dense ``K×(K−1)`` any optimizer needs. The switches add a ``B`` mask (``teach``), a scalar
    (``s_lr_multiplier``, ``weight``) or, for ``running_mean``, one more residual softmax per step.
    """

    def __init__(
        self,
        num_classes: int,
        label_smoothing: float = 0.0,
        acc_source: str = "running",
        normalisation: str = "mean",
        teach: str = "all",
        s_update: str = "gradient",
        weight: str = "one_minus_acc",
        weight_value: float | None = None,
        s_lr_multiplier: float = 1.0,
        s_init: str = "zeros",
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"ALRLoss needs num_classes >= 2, got {num_classes}")
        self.acc_source = _choice("acc_source", acc_source, ("running", "batch"))
        self.label_smoothing = _number("label_smoothing", label_smoothing, "a number in [0, 1)", lambda v: 0 <= v < 1)
        self.normalisation = _choice("normalisation", normalisation, NORMALISATIONS)
        self.teach = _choice("teach", teach, TEACH)
        self.s_update = _choice("s_update", s_update, S_UPDATES)
        self.weight = _choice("weight", weight, WEIGHTS)
        if weight == "constant":
            self.weight_value = _number(
                "weight_value", weight_value, "a number >= 0 with weight=constant", lambda v: v >= 0
            )
        elif weight_value is not None:
            raise ValueError(f"{KEY}.weight_value is used only with {KEY}.weight=constant; remove it (weight={weight})")
        else:
            self.weight_value = None
        self.s_lr_multiplier = _number("s_lr_multiplier", s_lr_multiplier, "a number > 0", lambda v: v > 0)
        if s_update == "running_mean" and self.s_lr_multiplier != 1.0:
            raise ValueError(
                f"{KEY}.s_lr_multiplier has no effect with {KEY}.s_update=running_mean (no optimizer trains S); "
                "leave it at 1"
            )
        self.s_init = _choice("s_init", s_init, S_INITS)
        self.num_classes = num_classes
        self.S = nn.Parameter(torch.zeros(num_classes, num_classes - 1), requires_grad=s_update == "gradient")
        self.S.lr_multiplier = self.s_lr_multiplier  # the trainer gives S a parameter group of lr × this
        # Running counts of this epoch's correct predictions; buffers so they land in checkpoints.
        self.register_buffer("correct", torch.zeros((), dtype=torch.float64))
        self.register_buffer("seen", torch.zeros((), dtype=torch.float64))
        if weight == "ramp":
            self.register_buffer("ramp_step", torch.zeros((), dtype=torch.int64))
            self._ramp_span: int | None = None  # steps from the first to the last, from setup()
        if s_update == "running_mean":  # this rank's sums of the epoch so far, reduced in end_epoch
            self.register_buffer("res_sums", torch.zeros(num_classes, num_classes - 1, dtype=torch.float64), False)
            self.register_buffer("res_counts", torch.zeros(num_classes, dtype=torch.float64), False)
        self._needs_setup = weight == "ramp" or s_init == "normal"

    def _scale(self) -> tuple[float, float, float, float]:
        """``(c_hard, c_res, c_upd, c_s)`` of :class:`_ALRFunction` for this normalisation (S's learning-rate
        multiplier acts through its parameter group, so ``c_s = c_upd``)."""
        K = self.num_classes
        residual = 1.0 if self.normalisation == "sum" else 1.0 / (K - 1)
        return (1.0 / K if self.normalisation == "class_mean" else 1.0, residual, residual, residual)

    def setup(self, facts: RunFacts) -> None:
        if self.weight == "ramp":
            self._ramp_span = max(facts.epochs * facts.steps_per_epoch - 1, 1)
        if self.s_init == "normal":
            draw = torch.randn(self.S.shape, generator=torch.Generator().manual_seed(facts.seed)) * S_INIT_STD
            with torch.no_grad():
                self.S.copy_(draw)
        self._needs_setup = False

    def reset_epoch(self) -> None:
        """Start a new epoch's running training accuracy."""
        self.correct.zero_()
        self.seen.zero_()

    def start_epoch(self, epoch: int) -> None:
        self.reset_epoch()
        for t in self.partial_sums().values():
            t.zero_()

    def partial_sums(self) -> dict[str, Tensor]:
        """``s_update=running_mean``: this rank's per-class sums of ``p_res`` and counts of the epoch so far."""
        if self.s_update != "running_mean":
            return {}
        return {"res_sums": self.res_sums, "res_counts": self.res_counts}

    def end_epoch(self, epoch: int, world: World) -> None:
        """``s_update=running_mean``: ``S[k] := log(mean p_res)`` over class k's teaching samples of the epoch,
        summed over every rank (the same ``S`` on each); a class without one keeps its row."""
        if self.s_update != "running_mean":
            return
        mean, counts = distributed.summed_means(self.res_sums, self.res_counts)
        log_mean = mean.clamp_min(torch.finfo(torch.float32).tiny).log().to(self.S.dtype)
        with torch.no_grad():
            self.S.copy_(torch.where(counts.unsqueeze(1) > 0, log_mean, self.S))

    def snapshots(self) -> dict[str, Tensor]:
        """``softmax(S)`` as K×K (Figure 3)."""
        return {"residual_labels": self.residual_labels()}

    @property
    def acc_train(self) -> Tensor:
        """Running top-1 training accuracy of the current epoch (a 0-dim tensor)."""
        return (self.correct / self.seen.clamp_min(1)).float()

    def residual_labels(self) -> Tensor:
        """``softmax(S)`` placed as a K×K matrix with a zero diagonal: row k = where class k's errors go."""
        return residual_matrix(self.S)

    def _scheduled_weight(self, z: Tensor) -> Tensor:
        """``w`` of ``weight=constant`` or ``ramp`` as a 0-dim device tensor (no host synchronisation)."""
        if self.weight == "constant":
            return z.new_full((), self.weight_value)
        w = (self.ramp_step.double() / self._ramp_span).clamp_(max=1.0).float()
        self.ramp_step += 1
        return w

    def _accumulate(self, z: Tensor, targets: Tensor, teach: Tensor | None) -> None:
        """Add this batch's teaching rows of ``p_res`` to their class's running sum (``s_update=running_mean``)."""
        p_res = torch.log_softmax(z.gather(1, residual_index(targets, self.num_classes)), dim=1).exp().double()
        rows = p_res.new_ones(targets.shape) if teach is None else teach.double()
        self.res_sums.index_add_(0, targets, p_res if teach is None else p_res * rows.unsqueeze(1))
        self.res_counts.index_add_(0, targets, rows)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if self._needs_setup:
            raise RuntimeError(f"ALRLoss(weight={self.weight!r}, s_init={self.s_init!r}) needs setup(facts) first")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            z = logits.float()
            with torch.no_grad():
                # max's indices are argmax's (the first maximum), at a third of argmax's cost on CPU
                hits = z.max(dim=1).indices == targets
                if self.weight == "one_minus_acc":
                    correct = hits.sum()
                    seen = targets.numel()
                    if distributed.initialized():  # the global batch's counts: w is the same on every rank
                        # full_like fills on the device; new_tensor(seen) would be a host-to-device copy, and the
                        # host would wait for the forward at every step before it could queue the backward.
                        counts = torch.stack([correct, torch.full_like(correct, seen)])
                        correct, seen = distributed.all_reduce_sum(counts)
                    if self.acc_source == "batch":
                        self.correct.zero_()
                        self.seen.zero_()
                    self.correct += correct
                    self.seen += seen
                    w = 1.0 - self.acc_train
                else:
                    w = self._scheduled_weight(z)
                teach = None if self.teach == "all" else (hits if self.teach == "correct" else ~hits).to(z.dtype)
                if self.s_update == "running_mean":
                    self._accumulate(z, targets, teach)
            loss, terms = _ALRFunction.apply(z, self.S.float(), targets, w, self.label_smoothing, self._scale(), teach)
        self.last_terms = {"L_hard": terms[0], "L_res": terms[1], "L_upd": terms[2], "w": w}
        return loss

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, label_smoothing={self.label_smoothing}, "
            f"acc_source={self.acc_source!r}, normalisation={self.normalisation!r}, "
            f"teach={self.teach!r}, s_update={self.s_update!r}, weight={self.weight!r}, "
            f"weight_value={self.weight_value}, s_lr_multiplier={self.s_lr_multiplier}, s_init={self.s_init!r}"
        )
