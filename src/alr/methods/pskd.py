"""Progressive self-knowledge distillation (PS-KD): the network's own last-epoch prediction as a soft target."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alr.data.batches import Batch
from alr.distributed import summed_means
from alr.methods.supervised import Method, RunFacts, StepOutput

if TYPE_CHECKING:
    from alr.distributed import World

MB = 2**20


class ProgressiveSelfKD(Method):
    r"""Progressive self-knowledge distillation (Kim et al., "Self-Knowledge Distillation with Progressive
    Refinement of Targets", ICCV 2021).

    Follows the authors' code, lgcnsai/PS-KD-Pytorch ``main.py`` (``main_worker``'s α schedule, ``train``) and
    ``loss/pskd_loss.py`` (``Custom_CrossEntropy_PSKD``):

    .. math:: L = -\sum_k \tfrac{1}{B}\sum_i \big[(1-\alpha_t)\,\mathrm{onehot}(y_i) + \alpha_t\,p_{t-1}(x_i)\big]_k
              \log \mathrm{softmax}(z_i)_k, \qquad \alpha_t = \max\!\big(0, \alpha_T\,\tfrac{t+1}{T}\big)

    * ``p_{t−1}(x_i)`` is the softmax the network gave sample ``i`` (``Batch.index``) at its training step
      of the previous epoch (train mode, augmented input), kept in ``previous`` (N×K float32, a persistent
      buffer). ``t`` is the 0-based epoch and ``T`` the run's epochs, so α grows linearly from ``α_T/T`` to
      ``α_T = 0.8`` in the last epoch.
    * **First epoch**: the authors write the one-hot label into the table before reading it, so the target
      is ``(1−α_0)·onehot + α_0·onehot``: plain cross entropy. Here a row that holds no prediction yet (all
      zeros, as ``previous`` starts) is read as the one-hot label: the same arithmetic in the first epoch,
      and the same target for a sample first trained on in a later epoch (``trainer.limit_train_batches``,
      or the last partial global batch an epoch drops), where the authors' zero row would give
      ``(1−α_t)·onehot``, a target that does not sum to 1.
    * This epoch's predictions go into per-rank partial sums (``current`` N×K and ``written`` N, the number
      of writes of each row; zeros where this rank wrote nothing; :meth:`partial_sums`). :meth:`end_epoch`
      sums both over the ranks and replaces the rows written this epoch with their mean; a row not seen this
      epoch (``trainer.limit_train_batches``, the last partial global batch) keeps its previous value, as the
      authors' table does.
    * The loss is ``(−target · log p).mean(0).sum()`` (their ``Custom_CrossEntropy_PSKD``), in float32 with
      autocast disabled. Terms logged: ``L_soft`` (the loss), ``L_hard`` (the cross entropy to the one-hot
      label, logged only) and ``alpha`` (``α_t``).

    Differences from the authors' code (also in docs/deviations.md#ps-kd): the table lives on the training
    device, not on the host; under several processes each rank's rows are summed at the end of the epoch
    instead of all-gathered into every rank's table after each step (the same table, since a sample is
    trained on at most once per epoch and its row is read before it is written); a sample without a
    prediction yet gets its label (above); ``max_state_mb`` refuses a data set whose tables would not fit
    (:meth:`setup`).
    """

    def __init__(self, alpha_T: float = 0.8, max_state_mb: float = 512) -> None:
        super().__init__()
        if not 0.0 <= alpha_T <= 1.0:
            raise ValueError(f"config key 'method.module.alpha_T' must be in [0, 1], got {alpha_T}")
        self.alpha_T, self.max_state_mb = alpha_T, max_state_mb
        self.epochs, self.epoch = 1, 0

    @staticmethod
    def state_bytes(num_train: int, num_classes: int) -> int:
        """Bytes of the tables: last epoch's and this epoch's predictions (N×K float32 each), the write counts."""
        return (2 * num_train * num_classes + num_train) * 4

    def setup(self, facts: RunFacts) -> None:
        """Refuse a data set without sample indices or one whose tables exceed ``max_state_mb``; allocate them."""
        if not facts.indexed:
            raise ValueError(
                "PS-KD keeps each training sample's last prediction by its index, and this data set's batches "
                "carry none (Batch.index); train PS-KD on a data set that yields it"
            )
        N, K = facts.num_train, facts.num_classes
        need = self.state_bytes(N, K) / MB
        if need > self.max_state_mb:
            raise ValueError(
                f"PS-KD keeps two tables of every training sample's prediction (float32, on the device): "
                f"{N:,} samples × {K:,} classes need {need:,.0f} MB, over method.max_state_mb={self.max_state_mb}. "
                "Raise method.max_state_mb if the device's memory and last.pt can hold that, or train PS-KD on a "
                "data set with fewer samples × classes"
            )
        self.epochs = facts.epochs
        self.register_buffer("previous", torch.zeros(N, K, device=facts.device))
        self.register_buffer("current", torch.zeros(N, K, device=facts.device), persistent=False)
        self.register_buffer("written", torch.zeros(N, device=facts.device), persistent=False)

    def alpha_t(self, epoch: int) -> float:
        """The authors' schedule: ``max(0, α_T·(epoch + 1)/epochs)`` for the 0-based ``epoch``."""
        return max(0.0, self.alpha_T * ((epoch + 1) / self.epochs))

    def partial_sums(self) -> dict[str, Tensor]:
        return {"current": self.current, "written": self.written}

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.current.zero_()
        self.written.zero_()

    @torch.no_grad()
    def end_epoch(self, epoch: int, world: World) -> None:
        """Rows written this epoch (on any rank) become their mean prediction; the others keep theirs."""
        mean, written = summed_means(self.current, self.written)
        self.previous.copy_(torch.where(written.unsqueeze(1) > 0, mean, self.previous))
        self.current.zero_()
        self.written.zero_()

    def get_extra_state(self) -> dict[str, int]:
        """The epoch being trained: a mid-epoch resume does not call :meth:`start_epoch` again."""
        return {"epoch": self.epoch}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])

    def forward(self, model: nn.Module, batch: Batch) -> StepOutput:
        targets, index = batch.targets, batch.index
        logits = model(batch.inputs)
        alpha = self.alpha_t(self.epoch)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            z = logits.float()
            log_p = F.log_softmax(z, dim=1)
            onehot = torch.zeros_like(z).scatter_(1, targets.unsqueeze(1), 1.0)
            last = self.previous.index_select(0, index)
            last = torch.where(last.sum(dim=1, keepdim=True) == 0, onehot, last)  # no prediction yet: the label
            soft = (1 - alpha) * onehot + alpha * last
            loss = (-soft * log_p).mean(0).sum()
            with torch.no_grad():
                if self.training:
                    self.current.index_add_(0, index, z.softmax(dim=1))
                    self.written.index_add_(0, index, torch.ones_like(index, dtype=self.written.dtype))
                l_hard = F.nll_loss(log_p, targets)
        terms = {"L_soft": loss.detach(), "L_hard": l_hard, "alpha": l_hard.new_full((), alpha)}
        return StepOutput(loss, logits, terms)

    def extra_repr(self) -> str:
        return f"alpha_T={self.alpha_T}, max_state_mb={self.max_state_mb}, epochs={self.epochs}"
