"""Training methods: the ALR loss family and the interface the trainer calls."""

from alr.methods.alr_loss import ALRLoss, residual_index
from alr.methods.distill import DeepMutualLearning, KnowledgeDistillation
from alr.methods.lspp import LabelSmoothingPP
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

__all__ = [
    "ALRLoss",
    "Criterion",
    "CrossEntropy",
    "DeepMutualLearning",
    "EpochHooks",
    "KnowledgeDistillation",
    "LabelSmoothingPP",
    "Method",
    "RunFacts",
    "StepOutput",
    "Supervised",
    "Update",
    "residual_index",
]
