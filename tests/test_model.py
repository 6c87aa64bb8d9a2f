"""SimpleCNN and the model registry (model.py); the built-in loops local_train and test (fedrest/training.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedrest.tasks.data import TensorData
from fedrest.training import local_train, test as evaluate
from model import MODELS, SimpleCNN, build_model


@pytest.fixture
def net():
    torch.manual_seed(0)
    return SimpleCNN()


def _batch(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("batch", [1, 3])
def test_output_shape(net, batch):
    net.eval()
    out = net(torch.zeros(batch, 1, 28, 28))
    assert out.shape == (batch, 10) and out.dtype == torch.float32


def test_state_dict_keys_include_batchnorm_buffers(net):
    state = net.state_dict()
    for bn, channels in (("bn1", 32), ("bn2", 64)):
        assert state[f"{bn}.running_mean"].shape == (channels,)
        assert state[f"{bn}.running_var"].shape == (channels,)
        nbt = state[f"{bn}.num_batches_tracked"]
        assert nbt.dtype == torch.int64 and nbt.dim() == 0 and nbt.item() == 0
    assert set(state) == {
        "conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
        "bn1.num_batches_tracked", "conv2.weight", "conv2.bias", "bn2.weight", "bn2.bias", "bn2.running_mean",
        "bn2.running_var", "bn2.num_batches_tracked", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    # conv1 320 + conv2 18,496 + fc1 1,179,776 + fc2 1,290 = 1,199,882, plus BatchNorm's affine 2*(32+64) = 192
    bn_params = sum(p.numel() for name, p in net.named_parameters() if name.startswith("bn"))
    assert bn_params == 192
    assert sum(p.numel() for p in net.parameters()) - bn_params == 1_199_882


def test_test_returns_exact_per_example_mean_loss_and_accuracy(net):
    images, labels = _batch(7, seed=1)
    labels[:3] = 4  # some repeated labels
    loss, accuracy = evaluate(net, images, labels, batch_size=3)  # batches of 3, 3, 1
    net.eval()
    with torch.no_grad():
        logits = net(images)
        expected_loss = float(F.cross_entropy(logits, labels, reduction="sum")) / 7
        expected_accuracy = int((logits.argmax(1) == labels).sum()) / 7
        batch_means = [float(F.cross_entropy(net(images[i:i + 3]), labels[i:i + 3])) for i in (0, 3, 6)]
    assert isinstance(loss, float) and isinstance(accuracy, float)
    assert loss == pytest.approx(expected_loss, rel=1e-6, abs=1e-7)
    assert accuracy == expected_accuracy
    # the mean of batch means (the usual mistake) is a different number for these batches
    assert abs(sum(batch_means) / 3 - expected_loss) > 1e-4
    # the batch size does not change the answer
    assert evaluate(net, images, labels, batch_size=1000)[0] == pytest.approx(expected_loss, rel=1e-6)


def test_test_accuracy_counts_correct_predictions(net):
    images, _ = _batch(5, seed=2)
    net.eval()
    with torch.no_grad():
        predicted = net(images).argmax(1)
    labels = predicted.clone()
    labels[:2] = (labels[:2] + 1) % 10  # exactly 2 of 5 wrong
    assert evaluate(net, images, labels, batch_size=2)[1] == pytest.approx(3 / 5)
    assert net.training is False


def test_test_rejects_empty_set(net):
    with pytest.raises(ValueError, match="no test examples"):
        evaluate(net, torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long))


def test_local_train_changes_weights_and_counts_samples(net):
    images, labels = _batch(6, seed=3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    seen_batches = []
    result = local_train(net, images, labels, epochs=2, batch_size=4, learning_rate=0.05, momentum=0.9, seed=1,
                         progress=lambda size, loss, seen: seen_batches.append((size, seen)))
    after = net.state_dict()
    assert result.num_samples == 6 and result.num_examples_seen == 12
    assert seen_batches == [(4, 4), (2, 6), (4, 10), (2, 12)]
    assert 0.0 <= result.accuracy <= 1.0 and result.loss > 0 and result.seconds >= 0
    for key in ("conv1.weight", "fc1.weight", "fc2.bias", "bn1.running_mean", "bn2.running_var"):
        assert not torch.equal(before[key], after[key]), key
    # 2 epochs of batches of 4 over 6 examples: 4 BatchNorm updates
    assert after["bn1.num_batches_tracked"].item() == 4
    assert all(bool(torch.isfinite(v).all()) for v in after.values() if v.is_floating_point())


def test_local_train_is_reproducible_for_a_seed():
    images, labels = _batch(8, seed=4)
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        net = SimpleCNN()
        net.dropout1.p = net.dropout2.p = 0.0  # dropout draws from the global RNG
        local_train(net, images, labels, epochs=1, batch_size=3, learning_rate=0.01, seed=5)
        states.append(net.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_local_train_rejects_empty_and_mismatched_data(net):
    with pytest.raises(ValueError, match="zero samples"):
        local_train(net, torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long), epochs=1, batch_size=4,
                    learning_rate=0.1)
    with pytest.raises(ValueError, match="x has 3 examples but y has 2"):
        local_train(net, torch.zeros(3, 1, 28, 28), torch.zeros(2, dtype=torch.long), epochs=1, batch_size=4,
                    learning_rate=0.1)


def test_tensor_batches_cover_every_example_once_in_a_seeded_order():
    x, y = torch.arange(10).float().view(10, 1), torch.arange(10)
    data = TensorData(x, y)
    batches = list(data.batches(4, torch.device("cpu"), torch.Generator().manual_seed(0)))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == list(range(10))
    assert all(torch.equal(bx.view(-1).long(), by) for bx, by in batches)  # x and y stay paired
    again = list(data.batches(4, torch.device("cpu"), torch.Generator().manual_seed(0)))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    assert torch.cat([b[1] for b in data.batches(4, torch.device("cpu"))]).tolist() == list(range(10))


def test_build_model():
    assert set(MODELS) == {"simple_cnn"}
    assert isinstance(build_model("simple_cnn"), SimpleCNN)
    with pytest.raises(KeyError, match="unknown model 'resnet9000'; known models: simple_cnn"):
        build_model("resnet9000")


def test_select_device():
    from utils import device_description, select_device

    assert select_device("cpu") == torch.device("cpu")
    assert device_description(torch.device("cpu")) == "cpu"
    assert select_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="prefer must be"):
        select_device("tpu")


def test_select_device_refuses_gpu_where_torch_sees_no_cuda_device(monkeypatch):
    """What a machine without CUDA reports, on any machine (with a GPU too): torch sees no device."""
    from utils import DeviceUnavailable, select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(DeviceUnavailable, match=r"CUDA is not available \(torch .*; 0 devices visible\)"):
        select_device("gpu")
    assert select_device(None) == torch.device("cpu")
