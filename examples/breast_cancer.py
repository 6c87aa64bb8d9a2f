"""Breast-cancer diagnosis from 30 tabular features (scikit-learn's Wisconsin data) with a small MLP."""
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.metrics import f1_score, roc_auc_score
from torch import nn

name = "breast-cancer-mlp"


def _split(test: bool):
    x, y = load_breast_cancer(return_X_y=True)  # float64 (569, 30), labels 0 (malignant) / 1 (benign)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, held = order[114:], order[:114]  # 20% for the coordinator's test set
    x = (x - x[train].mean(0)) / x[train].std(0)  # standardised with the training split's statistics
    return (x[held], y[held]) if test else (x[train], y[train])


def build_model():
    return nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 2))


def load_train_data(ctx):  # workers: --num-partitions/--partition-id cut each one's part
    return _split(test=False)


def load_test_data(ctx):  # the coordinator
    return _split(test=True)


def evaluate(model, data, settings):  # the default loss and accuracy, plus F1 and ROC AUC
    x, y = data
    logits = model(x.to(settings.device)).cpu()
    predicted, score = logits.argmax(1), logits.softmax(1)[:, 1]
    metrics = {"loss": nn.functional.cross_entropy(logits, y).item(),
               "accuracy": (predicted == y).float().mean().item(), "f1": f1_score(y, predicted)}
    if len(y.unique()) == 2:  # AUC needs both classes
        metrics["auc"] = roc_auc_score(y, score)
    return metrics
