"""Backbones. Each is built by ``hydra.utils.instantiate(cfg.model)`` with the data set's class count."""

from alr.models.digits_cnn import DigitsCNN
from alr.models.preact_resnet import PreActResNet18
from alr.models.resnet_cifar import ResNetCifar
from alr.models.text import CharCNN, FastText, TextRCNN, TextRNN, Transformer
from alr.models.wide_resnet import WideResNet

__all__ = [
    "CharCNN",
    "DigitsCNN",
    "FastText",
    "PreActResNet18",
    "ResNetCifar",
    "TextRCNN",
    "TextRNN",
    "Transformer",
    "WideResNet",
]
