"""Training methods: the ALR loss family and the interface the trainer calls."""

from alr.methods.alr_loss import ALRLoss, residual_index
from alr.methods.distill import DeepMutualLearning, KnowledgeDistillation
from alr.methods.supervised import CrossEntropy, Method, StepOutput, Supervised, Update

__all__ = [
    "ALRLoss",
    "CrossEntropy",
    "DeepMutualLearning",
    "KnowledgeDistillation",
    "Method",
    "StepOutput",
    "Supervised",
    "Update",
    "residual_index",
]
