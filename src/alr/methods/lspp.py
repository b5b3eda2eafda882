"""Label Smoothing++ (Chhabra et al., BMVC 2024): label smoothing towards a learned class-to-class matrix."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alr.methods.alr_loss import residual_matrix
from alr.methods.supervised import Criterion, RunFacts


class LabelSmoothingPP(Criterion):
    r"""Label Smoothing++ (LS++), after the authors' code: repository ``s-chh/LSPP``, file ``lspp.py``
    (class ``LSPP`` and ``cross_entropy_loss``); the optimizer set-up is their ``solver.py``.

    * ``C`` (``K×(K−1)``, zeros at start, an ``nn.Parameter``): row ``k`` is, after a softmax, how the
      smoothed mass of class ``k`` is spread over the other K−1 classes (in class order, the diagonal left
      out). Placed as a K×K matrix with a zero diagonal it is the authors' "C-matrix" (:meth:`c_matrix`).
    * Target ``q = (1−α)·onehot(y) + α·C[y]`` with α = 0.1 (their ``--margin`` default).
    * Loss, with ``p = softmax(z)`` and ``CE(a, b) = −Σ_j b_j·log(a_j + 10⁻⁶)`` summed over classes and
      averaged over the batch (their ``cross_entropy_loss``, the 10⁻⁶ inside the log included):

      .. math:: L = \tfrac12\,[\,CE(q,\ \hat p) + CE(p,\ \hat q)\,]

      ``p̂``, ``q̂`` detached: ``CE(q, p̂)`` (logged ``L_C``) trains only ``C``, ``CE(p, q̂)`` (``L_tgt``)
      only the backbone, each with half its gradient, as their ``(fwd_ce + bck_ce) / 2`` does.
    * ``C`` is trained by the run's optimizer and schedule in the method's parameter group, as their
      ``solver.py`` puts it in the one SGD optimizer; its weight decay is ``method.weight_decay``. Their
      default (``--apply_wd 1``) decays ``C`` like the network (5·10⁻⁴ on CIFAR-100), so the config's default
      is ``${optim.weight_decay}``; their ``--apply_wd 0`` (sharper matrices, they note) is
      ``method.weight_decay=0``.

    Where the suite differs (docs/deviations.md#ls-label-smoothing): ``C[y]`` is placed per batch row
    (a ``B×K`` gather) instead of building the K×K matrix each step; the values are the same. ``L_hard``
    (the one-hot cross entropy of the same logits) is logged as a monitor only: it is not part of the
    loss. All of it is computed in float32 with autocast disabled.
    """

    def __init__(self, num_classes: int, alpha: float = 0.1, eps: float = 1e-6) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"LS++ needs num_classes >= 2, got {num_classes}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"LS++: method.module.criterion.alpha must be in (0, 1), got {alpha}")
        if not eps > 0.0:
            raise ValueError(f"LS++: method.module.criterion.eps must be > 0 (the authors' 1e-6), got {eps}")
        self.num_classes, self.alpha, self.eps = num_classes, alpha, eps
        self.C = nn.Parameter(torch.zeros(num_classes, num_classes - 1))

    def setup(self, facts: RunFacts) -> None:
        if facts.num_classes != self.num_classes:
            raise ValueError(
                f"LS++ was built for {self.num_classes} classes but the data set has {facts.num_classes}: "
                "leave method.module.criterion.num_classes at ${dataset.num_classes}"
            )

    def c_matrix(self) -> Tensor:
        """``softmax(C)`` placed as a K×K matrix with a zero diagonal: row k = where class k's smoothed mass goes."""
        return residual_matrix(self.C)

    def snapshots(self) -> dict[str, Tensor]:
        return {"c_matrix": self.c_matrix()}

    def targets(self, targets: Tensor) -> Tensor:
        """The LS++ targets ``q`` (``B×K``, differentiable in ``C``) of the labels ``targets``."""
        K, alpha = self.num_classes, self.alpha
        rows = torch.softmax(self.C.float().index_select(0, targets), dim=1)  # B×(K−1)
        # Column j of a K-wide row is residual column j before the label and j − 1 after it; the label's own
        # column reads a zero appended at the end, as the authors' matrix has a zero at the diagonal.
        cols = torch.arange(K, device=targets.device)
        at = cols == targets.unsqueeze(1)
        index = torch.where(at, K - 1, cols - (cols > targets.unsqueeze(1)).long())
        placed = F.pad(rows, (0, 1)).gather(1, index)
        return torch.where(at, 1.0 - alpha, alpha * placed)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            z = logits.float()
            p = torch.softmax(z, dim=1)
            q = self.targets(targets)
            l_c = -(p.detach() * (q + self.eps).log()).sum(dim=1).mean()
            l_tgt = -(q.detach() * (p + self.eps).log()).sum(dim=1).mean()
            loss = (l_c + l_tgt) / 2
            with torch.no_grad():
                l_hard = F.cross_entropy(z, targets)
        self.last_terms = {"L_hard": l_hard, "L_tgt": l_tgt.detach(), "L_C": l_c.detach()}
        return loss

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, alpha={self.alpha}, eps={self.eps}"
