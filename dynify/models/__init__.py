"""Reference static models that dynify's examples and benchmarks convert."""

from dynify.models.cifar_resnet import (
    BasicBlock,
    CifarResNet,
    PadShortcut,
    cifar_resnet,
    cifar_resnet20,
    cifar_resnet32,
    cifar_resnet44,
    cifar_resnet56,
    cifar_resnet110,
)

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "PadShortcut",
    "cifar_resnet",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "cifar_resnet110",
]
