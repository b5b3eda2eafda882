"""Reference reproduction suite for "Adaptive Regularization of Labels" (ALR)."""

from alr.methods.alr_loss import ALRLoss

__version__ = "0.1.0"
# Bumped when a run folder's config or checkpoint layout changes incompatibly.
CONFIG_VERSION = 1

__all__ = ["ALRLoss", "CONFIG_VERSION", "__version__"]
