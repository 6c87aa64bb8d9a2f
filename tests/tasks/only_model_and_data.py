"""The smallest task: a model and data, nothing else (the built-in loops train and evaluate it). Real data:
scikit-learn's wine recognition set (178 samples, 13 features, 3 classes), standardised."""
import torch
from sklearn.datasets import load_wine
from torch import nn


def _data(test: bool):
    x, y = load_wine(return_X_y=True)
    x = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    y = torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    part = order[:40] if test else order[40:]
    return x[part], y[part]


def build_model():
    return nn.Sequential(nn.Linear(13, 16), nn.ReLU(), nn.Linear(16, 3))


def load_train_data(ctx):
    return _data(test=False)


def load_test_data(ctx):
    return _data(test=True)
