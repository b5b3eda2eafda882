"""The confidence penalty (Pereyra et al. 2017): cross entropy minus a multiple of the output entropy."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from alr.methods.supervised import Criterion


class ConfidencePenalty(Criterion):
    r"""Confidence penalty, from the paper (Pereyra et al., "Regularizing Neural Networks by Penalizing
    Confident Output Distributions", arXiv:1701.06548); the authors published no code, so this follows the
    paper's objective and its thresholded ("hinge") form.

    .. math:: L = CE(z, y) - \beta\, H(p), \qquad H(p) = -\textstyle\sum_j p_j \log p_j,\quad p = \mathrm{softmax}(z)

    With ``threshold`` Γ set, the paper's hinge: only entropies below Γ are penalised,

    .. math:: L = CE(z, y) + \beta \max(0,\ \Gamma - H(p)),

    which below Γ has the gradient of ``−β·H`` and above it none. Both terms are per sample, averaged over
    the batch. Logged: ``L_hard`` (the cross entropy), ``L_reg`` (the term added to it, β included, so
    ``loss = L_hard + L_reg``) and ``H`` (the batch's mean entropy, in nats).

    Choices (docs/deviations.md#confidence-penalty): β = 0.1 without the hinge is the suite's default,
    not a value the paper sets for this recipe; the hinge is added as a penalty (the paper prints it with a
    minus sign in front of β, which read literally would reward confidence below Γ). Computed in float32
    with autocast disabled.
    """

    def __init__(self, beta: float = 0.1, threshold: float | None = None) -> None:
        super().__init__()
        if not (math.isfinite(beta) and beta >= 0.0):
            raise ValueError(f"confidence penalty: method.module.criterion.beta must be >= 0, got {beta}")
        if threshold is not None and not (math.isfinite(threshold) and threshold > 0.0):
            raise ValueError(
                f"confidence penalty: method.module.criterion.threshold (Γ, in nats) must be > 0 or null for no "
                f"hinge, got {threshold}"
            )
        self.beta, self.threshold = beta, threshold

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            log_p = F.log_softmax(logits.float(), dim=1)
            l_hard = F.nll_loss(log_p, targets)
            entropy = -(log_p.exp() * log_p).sum(dim=1)
            if self.threshold is None:
                l_reg = -self.beta * entropy.mean()
            else:
                l_reg = self.beta * (self.threshold - entropy).clamp_min(0.0).mean()
            loss = l_hard + l_reg
        self.last_terms = {"L_hard": l_hard.detach(), "L_reg": l_reg.detach(), "H": entropy.detach().mean()}
        return loss

    def extra_repr(self) -> str:
        return f"beta={self.beta}, threshold={self.threshold}"
