"""The two methods of Table 4 that learn from another network: knowledge distillation and deep mutual learning.

Both follow the method interface of :mod:`alr.methods.supervised`: ``method(model, inputs, targets)``
returns a :class:`StepOutput`; the loss is computed in float32 whatever the autocast dtype.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from alr.checkpoint import load_checkpoint
from alr.data.batches import Batch
from alr.errors import RunError, TeacherNotFinished
from alr.methods.supervised import Method, RunFacts, StepOutput, Update


def kl_to(log_p_student: Tensor, log_p_target: Tensor) -> Tensor:
    """``KL(target ‖ student)`` summed over classes, mean over the batch (both arguments are log-probabilities)."""
    return F.kl_div(log_p_student, log_p_target, reduction="batchmean", log_target=True)


def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, alpha: float, temperature: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(1−α)·CE(z_s, y) + α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))`` in float32, and its terms."""
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        z_s, z_t, T = student_logits.float(), teacher_logits.float().detach(), temperature
        ce = F.cross_entropy(z_s, targets)
        kl = kl_to(F.log_softmax(z_s / T, dim=1), F.log_softmax(z_t / T, dim=1))
        loss = (1 - alpha) * ce + alpha * T * T * kl
    return loss, {"L_hard": ce.detach(), "L_kd": kl.detach()}


def dml_loss(logits: Tensor, peer_logits: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """``L_1 + L_2`` with ``L_i = CE(z_i, y) + KL(p_j ‖ p_i)``, ``p_j`` detached, in float32, and the four terms."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        z1, z2 = logits.float(), peer_logits.float()
        log_p1, log_p2 = F.log_softmax(z1, dim=1), F.log_softmax(z2, dim=1)
        ce1, ce2 = F.cross_entropy(z1, targets), F.cross_entropy(z2, targets)
        kl1, kl2 = kl_to(log_p1, log_p2.detach()), kl_to(log_p2, log_p1.detach())
        loss = ce1 + kl1 + ce2 + kl2
    terms = {"L_hard": ce1, "L_kl": kl1, "peer_L_hard": ce2, "peer_L_kl": kl2}
    return loss, {k: v.detach() for k, v in terms.items()}


def load_teacher(teacher_run: str | Path | None, dataset: str, num_classes: int) -> nn.Module:
    """The backbone of a finished run folder, built from its ``config.yaml`` with the weights of its ``last.pt``."""
    how = (
        "Train the teacher first (Table 4: python -m alr.train experiment=... model=wrn28_10 method=baseline) "
        "and set method.teacher_run=<its run folder>."
    )
    if not teacher_run:
        raise RunError(f"config key 'method.teacher_run' is not set. {how}")
    run = Path(teacher_run)
    if not (run / "config.yaml").is_file():
        raise RunError(f"config key 'method.teacher_run': no run folder at {run} (no config.yaml there). {how}")
    result = run / "result.json"
    status = json.loads(result.read_text()).get("status") if result.is_file() else "not started"
    if status != "finished":
        raise TeacherNotFinished(
            f"config key 'method.teacher_run': the teacher run {run} has not finished (status {status!r} in "
            f"{result.name}). Finish it by rerunning its command, or point method.teacher_run at a finished run."
        )
    cfg = OmegaConf.load(run / "config.yaml")
    if (cfg.dataset.name, cfg.dataset.num_classes) != (dataset, num_classes):
        raise RunError(
            f"config key 'method.teacher_run': the teacher {run} was trained on {cfg.dataset.name} with "
            f"{cfg.dataset.num_classes} classes, this run is {dataset} with {num_classes}. Use a teacher trained "
            "on the same data set."
        )
    if not (run / "last.pt").is_file():
        raise RunError(
            f"config key 'method.teacher_run': the teacher run {run} finished but kept no weights (no last.pt; "
            "it ran with trainer.keep_checkpoint=false). Train it again with trainer.keep_checkpoint=true "
            "(trainer.resume=false in its command)."
        )
    teacher = instantiate(cfg.model)
    teacher.load_state_dict(load_checkpoint(run / "last.pt")["model"])
    return teacher.eval().requires_grad_(False)


class KnowledgeDistillation(Method):
    r"""Knowledge distillation (Hinton et al. 2015), the ``kd`` row of ALR's Table 4 (§4.3).

    Settings and choices: docs/deviations.md#the-methods.

    .. math:: L = (1-\alpha)\,CE(z_s, y) + \alpha T^2\, KL(\mathrm{softmax}(z_t/T) \,\|\, \mathrm{softmax}(z_s/T))

    with α = 0.9 and T = 4 by default; the KL is summed over classes and averaged over the batch
    (``batchmean``), and the T² keeps its gradient's scale independent of T.

    Choices where the papers are silent (also in docs/deviations.md):

    * **The teacher** is the backbone of a finished run folder (``teacher_run``; Table 4: a WRN-28-10
      trained by ``baseline``), rebuilt from that run's ``config.yaml`` with the weights of its
      ``last.pt`` (the last epoch, as the tables report). It is frozen and always in eval mode
      (BN running statistics, no dropout).
    * **The teacher is not part of this module's state**: it is held outside the module tree, so it
      is in neither ``parameters()`` (the optimizer, the parameter count) nor ``state_dict()``
      (``last.pt``). A resumed run reloads it from ``teacher_run``, which the run's config records;
      a teacher folder that has gone or changed is therefore refused or reloaded, never duplicated.
    * **Inputs**: the teacher sees the student's augmented batch (the same crops and flips).
    """

    def __init__(
        self, teacher_run: str | None, dataset: str, num_classes: int, alpha: float = 0.9, temperature: float = 4.0
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0 or temperature <= 0:
            raise ValueError(f"KD needs 0 <= alpha <= 1 and temperature > 0, got alpha={alpha}, T={temperature}")
        self.alpha, self.temperature = alpha, temperature
        self._teacher = (load_teacher(teacher_run, dataset, num_classes),)  # a tuple hides it from nn.Module

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def setup(self, facts: RunFacts) -> None:
        # Onto the run's device here, once: .to() on this module does not reach the teacher, and a copy from the
        # host in the first training step would make that step wait for it.
        self.teacher.to(facts.device)

    def forward(self, model: nn.Module, batch: Batch) -> StepOutput:
        inputs, targets = batch.inputs, batch.targets
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        logits = model(inputs)
        loss, terms = kd_loss(logits, teacher_logits, targets, self.alpha, self.temperature)
        return StepOutput(loss, logits, terms)


class DeepMutualLearning(Method):
    r"""Deep mutual learning (Zhang et al. 2018), the ``dml`` row of ALR's Table 4 (§4.3).

    Settings and choices: docs/deviations.md#the-methods.

    A cohort of two networks of one architecture, the run's backbone (network 1) and ``peer``
    (network 2); each minimises

    .. math:: L_i = CE(z_i, y) + KL(p_j \,\|\, p_i), \qquad p_j \text{ detached}.

    Two update rules (``update``):

    * ``alternate`` (Zhang et al., Algorithm 1; the default of Table 4): network 1 is stepped on
      ``L_1``; its predictions are then computed again with its updated weights, and network 2 is
      stepped on ``L_2`` against them. Three forward passes per step (network 1 twice) and two
      optimizer steps.
    * ``simultaneous``: one forward pass each and one optimizer step on ``L_1 + L_2`` (since the
      peer's distribution is detached in each term, each network's gradient is its own ``L_i``'s).
      The cheaper variant, used by most re-implementations.

    Choices where the papers are silent (also in ``docs/table4.md``):

    * **One optimizer, two parameter groups.** The peer's parameters form the method's group
      (weight decay equal to the backbone's, ``configs/method/dml.yaml``). The trainer's ``update``
      sets every gradient to ``None`` before its backward pass, so the parameters a loss does not
      reach are not stepped, and every parameter keeps its own momentum buffer: that is exactly two
      SGD optimizers with the same schedule (a test checks it against a hand-written two-optimizer
      loop), and all of it is in ``last.pt``.
    * **Network 1's updated predictions** are computed in training mode (batch-norm batch statistics,
      a fresh dropout draw) without gradients; its batch-norm running statistics therefore see each
      batch twice under ``alternate``. Network 2's step reuses its forward pass from before network
      1's step (its weights have not changed in between).
    * **The peer belongs to this module**: its parameters go to the optimizer and into ``last.pt``; it is
      built by ``instantiate`` from the run's own model config (``peer: ${model}``) with its own random
      initialisation.
    * **Evaluation** scores both networks (``test/net1/acc``, ``test/net2/acc``); the run's accuracy
      (``test/acc``, ``final_test_acc``) is their mean, the DML paper's convention. The loss logged is
      ``L_1 + L_2``, the training accuracy network 1's; the peer's terms are ``peer_L_hard`` and ``peer_L_kl``.
    """

    UPDATES = ("alternate", "simultaneous")

    def __init__(self, peer: nn.Module, update: str = "alternate") -> None:
        super().__init__()
        if update not in self.UPDATES:
            raise ValueError(f"config key 'method.update': unknown {update!r}; use alternate or simultaneous")
        self.peer, self.update = peer, update

    def forward(self, model: nn.Module, batch: Batch) -> StepOutput:
        logits = model(batch.inputs)
        loss, terms = dml_loss(logits, self.peer(batch.inputs), batch.targets)
        return StepOutput(loss, logits, terms)

    def train_step(
        self,
        model: nn.Module,
        batch: Batch,
        update: Update,
        autocast: Callable[[], AbstractContextManager],
    ) -> StepOutput:
        if self.update == "simultaneous":
            return super().train_step(model, batch, update, autocast)
        inputs, targets = batch.inputs, batch.targets
        with autocast():
            logits, peer_logits = model(inputs), self.peer(inputs)
            loss1, terms1 = dml_loss(logits, peer_logits.detach(), targets)
        update(loss1)  # network 1 on L_1 (the peer's half of the sum has no gradient here)
        with torch.no_grad(), autocast():
            updated = model(inputs)
        with autocast():
            loss2, terms2 = dml_loss(updated, peer_logits, targets)
        update(loss2)  # network 2 on L_2, against network 1's updated predictions
        terms = {k: terms1[k] for k in ("L_hard", "L_kl")} | {k: terms2[k] for k in ("peer_L_hard", "peer_L_kl")}
        loss = terms["L_hard"] + terms["L_kl"] + terms["peer_L_hard"] + terms["peer_L_kl"]
        return StepOutput(loss, logits, terms)

    def networks(self) -> dict[str, nn.Module]:
        return {"net2": self.peer}

    @torch.no_grad()
    def predictions(self, model: nn.Module, inputs: Tensor) -> dict[str, Tensor]:
        """Both networks' logits: the run is scored by the mean of their accuracies."""
        return {"net1": model(inputs), "net2": self.peer(inputs)}
