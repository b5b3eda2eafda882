"""ALRLoss as it was before its switches existed (``src/alr/methods/alr_loss.py`` at commit e93ff6c), frozen.

The switches (teach, s_update, weight, s_lr_multiplier, s_init) promise that at their defaults the loss, its
terms and both gradients are bit for bit what this code computed. The test holds them to it by running both
in the same process on the same CPU (tests/test_alr_switches.py), never against bits recorded on another
machine: the float sums inside a softmax run in another order on another CPU or kernel dispatch.

Copied verbatim but for two things: the class names, and the all-reduce of the accuracy counts under several
processes (the tests run one). Do not edit it to follow the live loss; that is the point.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


class FrozenALRFunction(torch.autograd.Function):
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


class FrozenALRLoss(nn.Module):
    """``ALRLoss(num_classes, label_smoothing, acc_source, class_mean, residual_mean)`` at e93ff6c."""

    def __init__(
        self,
        num_classes: int,
        label_smoothing: float = 0.0,
        acc_source: str = "running",
        class_mean: bool = False,
        residual_mean: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.acc_source = acc_source
        self.class_mean = class_mean
        self.residual_mean = residual_mean or class_mean
        self.S = nn.Parameter(torch.zeros(num_classes, num_classes - 1))
        self.register_buffer("correct", torch.zeros((), dtype=torch.float64))
        self.register_buffer("seen", torch.zeros((), dtype=torch.float64))

    @property
    def acc_train(self) -> Tensor:
        return (self.correct / self.seen.clamp_min(1)).float()

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            z = logits.float()
            with torch.no_grad():
                correct = (z.max(dim=1).indices == targets).sum()
                seen = targets.numel()
                if self.acc_source == "batch":
                    self.correct.zero_()
                    self.seen.zero_()
                self.correct += correct
                self.seen += seen
                w = 1.0 - self.acc_train
            K = self.num_classes
            residual = 1.0 / (K - 1) if self.residual_mean else 1.0
            scale = (1.0 / K if self.class_mean else 1.0, residual, residual)
            loss, terms = FrozenALRFunction.apply(z, self.S.float(), targets, w, self.label_smoothing, scale)
        self.last_terms = {"L_hard": terms[0], "L_res": terms[1], "L_upd": terms[2], "w": w}
        return loss
