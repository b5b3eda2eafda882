"""Adaptive Regularization of Labels (ALR): the loss, as a drop-in ``nn.Module``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from alr import distributed
from alr.methods.supervised import Criterion


def residual_index(targets: Tensor, num_classes: int) -> Tensor:
    """Column indices of each row's non-target classes, in class order: shape ``B×(K−1)``.

    Column ``j`` of a residual row for label ``k`` is class ``j`` if ``j < k``, else ``j + 1``
    (docs/deviations.md#alrs-loss). Built per batch, never as a K×K matrix.
    """
    cols = torch.arange(num_classes - 1, device=targets.device)
    return cols + (cols >= targets.unsqueeze(1))  # int64 + bool: one kernel, no conversion pass


def alr_terms_reference(
    logits: Tensor, S: Tensor, targets: Tensor, label_smoothing: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """``(L_hard, L_res, L_upd)`` written as plain autograd ops, straight from eq. 3–5 (docs/deviations.md#alrs-loss).

    The definition :class:`ALRLoss`'s fused path is tested against (values and gradients) and
    benchmarked beside (``bench/bench_loss.py``); not used for training.
    """
    l_hard = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    log_p_res = torch.log_softmax(logits.gather(1, residual_index(targets, logits.shape[1])), dim=1)
    log_q_res = torch.log_softmax(S[targets], dim=1)
    l_res = -(log_q_res.detach().exp() * log_p_res).sum(dim=1).mean()
    l_upd = -(log_p_res.detach().exp() * log_q_res).sum(dim=1).mean()
    return l_hard, l_res, l_upd


class _ALRFunction(torch.autograd.Function):
    """``L_hard + w·L_res + L_upd`` in one node, its backward the closed form of eq. 7–8.

    Plain autograd (:func:`alr_terms_reference`) measures about 14× a fused cross entropy at K=1000:
    two more softmaxes, a gather and an index whose backward passes each build their own zero
    tensors, and a dozen small nodes. Here one log-softmax of ``z`` serves ``L_hard`` and the backward
    (``p = exp(log_p)``); ``p_res − q_res`` is kept from the forward; the gradients are written
    directly:

    * ``∂L/∂z = c_h·(p − (1−ε)·onehot(y) − ε/K) + w·c_r·(p_res − q_res)`` at the non-target columns,
    * ``∂L/∂S[k] = c_u·Σ_{i: y_i=k} (q_res_i − p_res_i)``, both divided by B.

    ``p_res`` is the ``log_softmax`` of the residual logits themselves, not ``p_j / (1 − p_y)``: the
    latter loses ``1 − p_y`` to rounding once ``p_y`` is within float32's epsilon of 1.
    Returns the loss and the three terms (``c·L/B`` each, not differentiable). The backward is
    first-order only (``once_differentiable``): training never differentiates it again.
    """

    @staticmethod
    def forward(ctx, z, S, targets, w, eps, scale):
        B, K = z.shape
        c_hard, c_res, c_upd = scale
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
        l_upd = torch.dot(p_res.view(-1), log_q_res.view(-1)).neg()
        terms = torch.stack([l_hard * (c_hard / B), l_res * (c_res / B), l_upd * (c_upd / B)])
        loss = terms[0] + w * terms[1] + terms[2]
        ctx.save_for_backward(log_p, targets, before, p_res.sub_(q_res), w)
        ctx.eps, ctx.scale = eps, scale
        ctx.mark_non_differentiable(terms)
        return loss, terms

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_terms):
        log_p, targets, before, d_res, w = ctx.saved_tensors
        eps, (c_hard, c_res, c_upd) = ctx.eps, ctx.scale
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
            grad_S = d_res.new_zeros(K, K - 1).index_add_(0, targets, d_res * (g * -c_upd))
        return grad_z, grad_S, None, None, None, None


class ALRLoss(Criterion):
    r"""Adaptive label regularization (Ding et al., "Adaptive Regularization of Labels", §3.2).

    ``loss = criterion(logits, targets)`` returns

    .. math:: L = L_{hard} + w\,L_{res} + L_{upd}, \qquad w = 1 - acc_{train}

    * ``S`` (``K×(K−1)``, zeros at start, an ``nn.Parameter``) is the residual correlation
      matrix, eq. 3; ``q_res = softmax(S[y])`` is the residual label.
    * ``z_res`` is each row of the logits with its ground-truth column removed, the other
      columns kept in class order; ``p_res = softmax(z_res)``.
    * ``L_upd = −Σ p̂_res · log q_res`` (eq. 4): trains ``S`` only (``p̂`` detached).
    * ``L_res = −Σ q̂_res · log p_res`` (eq. 5): trains the backbone only (``q̂`` detached).
    * ``L_hard = CE(z, y)``, label-smoothed with ``label_smoothing`` for ALR-S.

    Choices where the paper is silent (also in docs/deviations.md):

    * **Normalisation.** Eq. 4–5 write ``1/(K−1)`` in front of ``L_res`` and ``L_upd`` and the CE of
      §3 ``1/K``, but the gradients of eq. 7–8 carry no such factor. Default: every term a plain cross
      entropy (sum over classes, mean over the batch), as eq. 8 describes. ``residual_mean=True``
      averages ``L_res`` and ``L_upd`` over the K−1 residual classes, ``L_hard`` the usual cross entropy:
      the residual pull is then (K−1)× weaker. ``class_mean=True`` is the literal reading, which also
      divides ``L_hard`` by K (and so the effective learning rate); it implies ``residual_mean``.
    * **acc_train** (the weight of §3.2, "approximately" ``1 − acc_train``): the running top-1
      accuracy of this epoch's training batches *including the current one*, from the same logits,
      reset by :meth:`reset_epoch`. ``acc_source="batch"`` uses the current batch alone. The
      counters are device tensors, so no host synchronisation happens per step. Under several
      processes the counts are summed over them (the global batch), so ``w`` is the same on every rank.
    * **Precision.** All of the loss is computed in float32 with autocast disabled, whatever the
      logits' dtype, so fp16/bf16 training cannot overflow inside the softmaxes.
    * ``S`` is trained by the run's own optimizer and schedule (its own parameter group; the
      trainer gives it weight decay 0 unless configured), as the paper trains it jointly.

    Speed: the three terms and their gradients are one autograd node whose backward writes the
    closed forms of eq. 7–8 (:class:`_ALRFunction`); tests hold it to the plain autograd
    definition :func:`alr_terms_reference`. No K×K matrix is built per step; ``S``'s gradient is
    the dense ``K×(K−1)`` any optimizer needs.
    """

    def __init__(
        self,
        num_classes: int,
        label_smoothing: float = 0.0,
        acc_source: str = "running",
        class_mean: bool = False,
        residual_mean: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"ALRLoss needs num_classes >= 2, got {num_classes}")
        if acc_source not in ("running", "batch"):
            raise ValueError(f"acc_source must be 'running' or 'batch', got {acc_source!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.acc_source = acc_source
        self.class_mean = class_mean
        self.residual_mean = residual_mean or class_mean
        self.S = nn.Parameter(torch.zeros(num_classes, num_classes - 1))
        # Running counts of this epoch's correct predictions; buffers so they land in checkpoints.
        self.register_buffer("correct", torch.zeros((), dtype=torch.float64))
        self.register_buffer("seen", torch.zeros((), dtype=torch.float64))

    def reset_epoch(self) -> None:
        """Start a new epoch's running training accuracy."""
        self.correct.zero_()
        self.seen.zero_()

    def start_epoch(self, epoch: int) -> None:
        self.reset_epoch()

    def snapshots(self) -> dict[str, Tensor]:
        """``softmax(S)`` as K×K (Figure 3)."""
        return {"residual_labels": self.residual_labels()}

    @property
    def acc_train(self) -> Tensor:
        """Running top-1 training accuracy of the current epoch (a 0-dim tensor)."""
        return (self.correct / self.seen.clamp_min(1)).float()

    def residual_labels(self) -> Tensor:
        """``softmax(S)`` placed as a K×K matrix with a zero diagonal: row k = where class k's errors go."""
        K = self.num_classes
        q = torch.softmax(self.S.detach().float(), dim=1)
        full = q.new_zeros(K, K)
        rows = torch.arange(K, device=q.device)
        full.scatter_(1, residual_index(rows, K), q)
        return full

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            z = logits.float()
            with torch.no_grad():
                # max's indices are argmax's (the first maximum), at a third of argmax's cost on CPU
                correct = (z.max(dim=1).indices == targets).sum()
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
            K = self.num_classes
            residual = 1.0 / (K - 1) if self.residual_mean else 1.0
            scale = (1.0 / K if self.class_mean else 1.0, residual, residual)
            loss, terms = _ALRFunction.apply(z, self.S.float(), targets, w, self.label_smoothing, scale)
        self.last_terms = {"L_hard": terms[0], "L_res": terms[1], "L_upd": terms[2], "w": w}
        return loss

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, label_smoothing={self.label_smoothing}, "
            f"acc_source={self.acc_source!r}, class_mean={self.class_mean}, residual_mean={self.residual_mean}"
        )
