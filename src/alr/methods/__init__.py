"""Training methods: the ALR loss family and the interface the trainer calls."""

from alr.methods.alr_loss import ALRLoss, residual_index
from alr.methods.confidence_penalty import ConfidencePenalty
from alr.methods.distill import DeepMutualLearning, KnowledgeDistillation
from alr.methods.disturblabel import DisturbLabel
from alr.methods.lspp import LabelSmoothingPP
from alr.methods.ols import OnlineLabelSmoothing
from alr.methods.pskd import ProgressiveSelfKD
from alr.methods.supervised import (
    Criterion,
    CrossEntropy,
    EpochHooks,
    Method,
    RunFacts,
    StepOutput,
    Supervised,
    Update,
)
from alr.methods.tfkd import TeacherFreeKD

__all__ = [
    "ALRLoss",
    "ConfidencePenalty",
    "Criterion",
    "CrossEntropy",
    "DeepMutualLearning",
    "DisturbLabel",
    "EpochHooks",
    "KnowledgeDistillation",
    "LabelSmoothingPP",
    "Method",
    "OnlineLabelSmoothing",
    "ProgressiveSelfKD",
    "RunFacts",
    "StepOutput",
    "Supervised",
    "TeacherFreeKD",
    "Update",
    "residual_index",
]
