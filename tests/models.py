"""Small models used across the tests (the paper's MNIST CNN, docs/math.md §6, among them)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from curvrate_fast.experiments.mnist import MnistCNN  # noqa: F401  (the paper's CNN, docs/math.md §6)


class ResidualLN(nn.Module):
    def __init__(self, d=8, classes=3):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = x + self.fc2(F.gelu(self.fc1(self.ln(x))))
        return self.head(h)


class EncoderClassifier(nn.Module):
    def __init__(self, d=16, heads=2, classes=3, norm_first=False, activation="relu"):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True,
                                              norm_first=norm_first, activation=activation)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


class SpecialFunctionModel(nn.Module):
    """Uses special functions (lgamma, i0), whose rules come from their derivative identities."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.lgamma(x * x + 1) + torch.special.i0(x))


def mlp(act, d_in=5, width=16, classes=3):
    return nn.Sequential(nn.Linear(d_in, width), act, nn.Linear(width, width), act,
                         nn.Linear(width, classes))


class CountingIdentity(nn.Module):
    """The identity, counting its forward calls in a buffer and keeping an EMA of its input's
    mean over the batch (both in place, without grad): a module whose forward updates buffers."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))
        self.register_buffer("ema", torch.zeros(width, dtype=torch.float64))

    def forward(self, x):
        with torch.no_grad():
            self.calls.add_(1)
            self.ema.mul_(0.9).add_(0.1 * x.mean(0))
        return x
