"""LeNet-5 as LeCun et al. (1998) built it: its parameter count, each stage's shape, tanh and average pooling."""

import torch

from lenet_dist.model import LeNet5


def test_parameter_count_is_lenet5s():
    assert sum(p.numel() for p in LeNet5().parameters()) == 61_706


def test_stage_shapes():
    model = LeNet5()
    images = torch.zeros(3, 1, 28, 28)
    after_conv1 = model.conv1(images)
    after_conv2 = model.conv2(after_conv1)
    assert after_conv1.shape == (3, 6, 14, 14)
    assert after_conv2.shape == (3, 16, 5, 5)
    assert model.classifier(after_conv2).shape == (3, 10)
    assert model(images).shape == (3, 10)


def test_uses_tanh_and_average_pooling():
    kinds = {type(module).__name__ for module in LeNet5().modules()}
    assert {"Tanh", "AvgPool2d"} <= kinds
    assert not {"ReLU", "MaxPool2d"} & kinds
