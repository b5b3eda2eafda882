"""Teacher-free knowledge distillation, the regularisation variant (Yuan et al., CVPR 2020): KD from a
hand-made virtual teacher."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from alr.methods.supervised import Criterion


class TeacherFreeKD(Criterion):
    r"""Tf-KD\ :sub:`reg`, after the authors' code: repository ``yuanli2333/Teacher-free-Knowledge-Distillation``,
    file ``my_loss_function.py``, function ``loss_kd_regularization``; the defaults are their ResNet-18
    CIFAR-100 settings (``experiments/base_experiments/base_resnet18/params.json``: ``reg_alpha`` 0.1,
    ``reg_temperature`` 20, ``multiplier`` 100), used here for every backbone and data set.

    * Virtual teacher ``u``: ``correct_prob`` = 0.99 on the label, ``(1 − 0.99)/(K−1)`` on every other class;
      softened as their code does, ``p_t = softmax(u / T)``: a softmax of the *probabilities* ``u`` over T
      (at K = 100, T = 20 that is 1.05 % on the label and 0.9995 % elsewhere, close to uniform).
    * The student is not softened: ``log p = log_softmax(z)``, and there is no ``T²`` factor.
    * ``KL(p_t ‖ p)`` reduced as ``nn.KLDivLoss()``'s default did in the torch they pinned (1.2):
      ``mean`` over all B·K elements, then times ``multiplier``:

      .. math:: L = (1-\alpha)\,CE(z, y) + \alpha\,m\,\tfrac{1}{BK}\sum_{i,j} p_{t,ij}(\log p_{t,ij} - \log p_{ij})

    Logged: ``L_hard`` (the cross entropy) and ``L_reg`` (``m·KL`` as reduced above, their
    ``loss_soft_regu``), so ``loss = (1−α)·L_hard + α·L_reg``. Where the suite differs
    (docs/deviations.md#tf-kd): the teacher is built with one ``scatter`` instead of a Python loop over the
    batch; computed in float32 with autocast disabled.
    """

    def __init__(
        self, alpha: float = 0.1, temperature: float = 20.0, multiplier: float = 100.0, correct_prob: float = 0.99
    ) -> None:
        super().__init__()
        key = "TF-KD: method.module.criterion"
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"{key}.alpha must be in [0, 1], got {alpha}")
        if not (math.isfinite(temperature) and temperature > 0.0):
            raise ValueError(f"{key}.temperature must be > 0, got {temperature}")
        if not (math.isfinite(multiplier) and multiplier >= 0.0):
            raise ValueError(f"{key}.multiplier must be >= 0, got {multiplier}")
        if not 0.0 < correct_prob < 1.0:
            raise ValueError(f"{key}.correct_prob must be in (0, 1), got {correct_prob}")
        self.alpha, self.temperature, self.multiplier, self.correct_prob = alpha, temperature, multiplier, correct_prob

    def teacher(self, targets: Tensor, num_classes: int) -> Tensor:
        """The softened virtual teacher ``softmax(u / T)`` of the labels ``targets`` (``B×K``, float32)."""
        a, K = self.correct_prob, num_classes
        u = torch.full((targets.numel(), K), (1 - a) / (K - 1), device=targets.device)
        u.scatter_(1, targets.unsqueeze(1), a)
        return torch.softmax(u / self.temperature, dim=1)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            B, K = logits.shape
            if K < 2:
                raise ValueError(f"TF-KD needs at least 2 classes, got logits of {K}")
            log_p = F.log_softmax(logits.float(), dim=1)
            l_hard = F.nll_loss(log_p, targets)
            # reduction="sum" / (B·K): the element-wise "mean" without torch's warning about it
            kl = F.kl_div(log_p, self.teacher(targets, K), reduction="sum") / (B * K)
            l_reg = self.multiplier * kl
            loss = (1.0 - self.alpha) * l_hard + self.alpha * l_reg
        self.last_terms = {"L_hard": l_hard.detach(), "L_reg": l_reg.detach()}
        return loss

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, temperature={self.temperature}, multiplier={self.multiplier}, "
            f"correct_prob={self.correct_prob}"
        )
