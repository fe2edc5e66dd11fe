"""Small models used across the tests (the paper's MNIST CNN, SPEC.md §6, among them)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class MnistCNN(nn.Module):
    """The PyTorch MNIST example CNN of the paper (SPEC.md §6)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.5)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return self.fc2(x)


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


class NoRuleModel(nn.Module):
    """Uses ops without Taylor rules (lgamma, i0): they take the exact generic fallback."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.lgamma(x * x + 1) + torch.special.i0(x))


def mlp(act, d_in=5, width=16, classes=3):
    return nn.Sequential(nn.Linear(d_in, width), act, nn.Linear(width, width), act,
                         nn.Linear(width, classes))
