"""A task with its own training step (Adam) and its own metric (top-2 accuracy): scikit-learn's real 8x8 digits
(1,797 images) and a linear model. Used by tests/test_tasks*.py."""
import torch
from sklearn.datasets import load_digits
from torch import nn

name = "digits-adam"


def _data(test: bool):
    x, y = load_digits(return_X_y=True)  # (1797, 64) in 0..16, labels 0..9
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    return (x[1500:], y[1500:]) if test else (x[:1500], y[:1500])


def build_model():
    return nn.Linear(64, 10)


def load_train_data(ctx):
    return _data(test=False)


def load_test_data(ctx):
    return _data(test=True)


def train(model, data, settings):
    x, y = data
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    generator = torch.Generator().manual_seed(settings.seed)
    total, seen = 0.0, 0
    for _ in range(settings.local_epochs):
        for idx in torch.randperm(len(y), generator=generator).split(settings.batch_size):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total, seen = total + loss.item() * len(idx), seen + len(idx)
    return {"loss": total / seen}


def evaluate(model, data, settings):
    x, y = data
    logits = model(x.to(settings.device)).cpu()
    top2 = logits.topk(2, dim=1).indices
    return {"accuracy": (logits.argmax(1) == y).float().mean().item(),
            "top2_accuracy": (top2 == y[:, None]).any(1).float().mean().item()}
