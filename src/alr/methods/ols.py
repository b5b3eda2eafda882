"""Online Label Smoothing (OLS): a soft label per class, learned from last epoch's correct predictions."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from alr.distributed import summed_means
from alr.methods.supervised import Criterion

if TYPE_CHECKING:
    from alr.distributed import World


class OnlineLabelSmoothing(Criterion):
    r"""Online label smoothing (Zhang et al., "Delving Deep into Label Smoothing", IEEE TIP 2021).

    Follows the authors' CIFAR code, zhangchbin/OnlineLabelSmoothing ``cifar/scripts/train_cifar_all_methods.py``
    (``Solver.update_loss_lams``, ``Solver.soft_cross_entropy``, the ``ols`` branch of ``Solver.train``):

    .. math:: L = \alpha\,CE(z, y) + (1-\alpha)\,CE(z, S_{t-1}[y]), \qquad \alpha = 0.5

    * ``S`` (``soft_labels``, K×K, a persistent buffer) is the soft label of every class used this epoch.
      Row k is the mean softmax of the training samples of class k that the network classified correctly
      (top-1, from the training step's own logits) in the previous epoch.
    * **First epoch**: ``S`` starts at zeros, as the authors' ``self.loss_lams = torch.zeros(K, K)``, so the
      soft term is 0 and the first epoch trains on ``α·CE(z, y)`` alone.
    * **A class with no correct sample** in an epoch gets the uniform row ``1/K`` (their ``cur_epoch_cnt <
      0.5`` branch), not the previous epoch's row.
    * Per-rank sums of this epoch (``class_sums`` K×K, ``class_counts`` K) are non-persistent buffers named by
      :meth:`partial_sums`; :meth:`end_epoch` sums them over the ranks and replaces ``S``.

    Where the suite does something else (also in docs/deviations.md#ols): the sums are built with two
    ``index_add_`` on the device instead of a Python loop over the batch; a sample is "correct" when its
    logits' first maximum is its label (theirs: the first index of a descending ``argsort`` of the softmax;
    the two differ only on exact ties); all of the loss is computed in float32 with autocast disabled.
    """

    def __init__(self, num_classes: int, alpha: float = 0.5) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"OnlineLabelSmoothing needs num_classes >= 2, got {num_classes}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"config key 'method.module.criterion.alpha' must be in [0, 1], got {alpha}")
        self.num_classes, self.alpha = num_classes, alpha
        self.register_buffer("soft_labels", torch.zeros(num_classes, num_classes))
        self.register_buffer("class_sums", torch.zeros(num_classes, num_classes), persistent=False)
        self.register_buffer("class_counts", torch.zeros(num_classes), persistent=False)

    def partial_sums(self) -> dict[str, Tensor]:
        return {"class_sums": self.class_sums, "class_counts": self.class_counts}

    def start_epoch(self, epoch: int) -> None:
        self.class_sums.zero_()
        self.class_counts.zero_()

    @torch.no_grad()
    def end_epoch(self, epoch: int, world: World) -> None:
        """``S[k]`` = the epoch's mean softmax of class k's correct samples over all ranks; ``1/K`` where none."""
        mean, counts = summed_means(self.class_sums, self.class_counts)
        self.soft_labels.copy_(torch.where(counts.unsqueeze(1) < 0.5, 1.0 / self.num_classes, mean))
        self.class_sums.zero_()
        self.class_counts.zero_()

    def snapshots(self) -> dict[str, Tensor]:
        """The soft labels used in the epoch that follows (row k: class k's)."""
        return {"soft_labels": self.soft_labels}

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            z = logits.float()
            log_p = F.log_softmax(z, dim=1)
            if self.training:
                with torch.no_grad():
                    correct = (z.max(dim=1).indices == targets).float()
                    self.class_sums.index_add_(0, targets, z.softmax(dim=1) * correct.unsqueeze(1))
                    self.class_counts.index_add_(0, targets, correct)
            l_hard = F.nll_loss(log_p, targets)
            l_soft = -(self.soft_labels.index_select(0, targets) * log_p).sum(dim=1).mean()
            loss = self.alpha * l_hard + (1.0 - self.alpha) * l_soft
        self.last_terms = {"L_hard": l_hard.detach(), "L_soft": l_soft.detach()}
        return loss

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, alpha={self.alpha}"
