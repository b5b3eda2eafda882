"""Backbones. Each is built by ``hydra.utils.instantiate(cfg.model)`` with the data set's class count."""

from alr.models.digits_cnn import DigitsCNN

__all__ = ["DigitsCNN"]
