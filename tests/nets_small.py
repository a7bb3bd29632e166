"""A small PyTorch net with a direct, a weight and a concat site and a BatchNorm1d (tests only)."""
import torch
from torch import nn


class SiteNet(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.drop_a = nn.Dropout(0.5)
        self.bn_direct = nn.BatchNorm2d(6)
        self.relu1 = nn.ReLU()
        self.drop_b = nn.Dropout(0.3)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn_weight = nn.BatchNorm2d(6)
        self.relu2 = nn.ReLU()
        self.drop_c = nn.Dropout2d(0.2)
        self.bn_concat = nn.BatchNorm2d(12)
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(12, 8)
        self.drop_d = nn.Dropout(0.5)
        self.bn1d = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, classes)

    def forward(self, x):
        a = self.conv1(x)
        h = self.drop_a(a)
        h = self.bn_direct(h)
        h = self.relu1(h)
        h = self.drop_b(h)
        h = self.conv2(h)
        h = self.bn_weight(h)
        h = self.relu2(h)
        h = torch.cat([self.drop_c(h), a], 1)
        h = self.bn_concat(h)
        h = self.relu3(h)
        h = self.pool(h)
        h = self.flatten(h)
        h = self.fc1(h)
        h = self.drop_d(h)
        h = self.bn1d(h)
        return self.fc2(h)


def trained_like(seed: int = 0) -> SiteNet:
    """A SiteNet whose BN statistics were gathered in train mode (dropout on), as after training."""
    torch.manual_seed(seed)
    net = SiteNet()
    net.train()
    with torch.no_grad():
        for _ in range(20):
            net(torch.randn(32, 3, 8, 8) * 2 + 0.5)
    return net.eval()


def module_name(onnx_bn_name: str) -> str:
    """'/bn_direct/BatchNormalization' -> 'bn_direct'."""
    return onnx_bn_name.strip("/").rsplit("/", 1)[0].replace("/", ".")
