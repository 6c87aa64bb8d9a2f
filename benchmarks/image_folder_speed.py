"""A folder of real PNG images against the same images from IDX files: training speed per epoch.

Writes Fashion-MNIST (Debian's dataset-fashion-mnist, or any source of the built-in task) as PNG class folders with
``examples/make_image_folders.py``, then trains SimpleCNN (E=1, B=32, SGD lr 0.01 momentum 0.9, one CPU thread,
the same seed) for two epochs from each:

- ``idx``: the built-in ``fashion-mnist`` task, tensors in memory (the fast path);
- ``png``: the ``image-folder`` task (``--image-size 28 --image-channels 1 --model simple_cnn``, Fashion-MNIST's
  mean and std), read through a DataLoader; the first epoch decodes every PNG once into the in-memory cache;
- ``png, streamed``: the same with ``--cache-bytes 0``, one epoch through the DataLoader.

Prints samples/s per epoch, the first epoch's cost (decoding), the ratio of the PNG path to the IDX path after the
first epoch, and each model's test accuracy after the two epochs.

    .venv/bin/python benchmarks/image_folder_speed.py [--out /tmp/fashion-png] [--data-workers 1]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from config import Config  # noqa: E402
from fedrest.tasks import TrainSettings, load_task  # noqa: E402
from fedrest.tasks.node_data import context  # noqa: E402


def epochs(cfg: Config, test_dir: str, n: int) -> tuple[list[float], float, int]:
    """(seconds of each of ``n`` epochs, test accuracy after them, training examples) for the task of ``cfg``,
    tested on the data of ``test_dir``."""
    task = load_task(cfg)
    train = task.load_data(context(cfg, "worker"), "train")
    test = task.load_data(context(cfg.replace(data_dir=test_dir), "coordinator"), "test")
    torch.manual_seed(0)
    model = task.build_model()
    cpu = torch.device("cpu")
    times = []
    for epoch in range(n):
        settings = TrainSettings(epoch + 1, 1, 32, 0.01, 0.9, epoch, cpu, 1000)
        started = time.perf_counter()
        task.train(model, train, settings)
        times.append(time.perf_counter() - started)
    return times, task.evaluate(model, test, TrainSettings(0, 1, 32, 0.0, 0.0, 0, cpu, 1000))["accuracy"], len(train)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/fashion-png"), help="where the PNG folders go")
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--data-workers", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if not (args.out / "test").is_dir():
        started = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "examples" / "make_image_folders.py"), "--out", str(args.out),
                        "--dataset", "fashion-mnist", "--data-dir", args.data_dir], check=True)
        print(f"wrote the PNG folders in {time.perf_counter() - started:.0f}s")
    idx = Config(task="fashion-mnist", data_dir=args.data_dir)
    png = Config(task="image-folder", model="simple_cnn", image_size=28, image_channels=1, normalize_mean="0.2860",
                 normalize_std="0.3530", data_dir=str(args.out / "worker0"), data_workers=args.data_workers)
    results = {}
    png_test = str(args.out / "test")
    for name, cfg, test_dir, n in (("idx", idx, args.data_dir, 2), ("png", png, png_test, 2),
                                   ("png, streamed", png.replace(cache_bytes=0), png_test, 1)):
        times, accuracy, count = epochs(cfg, test_dir, n)
        results[name] = times
        rates = ", ".join(f"epoch {i + 1}: {count / t:.0f} samples/s ({t:.1f}s)" for i, t in enumerate(times))
        print(f"{name:14s} {count} images: {rates}; test accuracy {accuracy:.4f}", flush=True)
    ratio = results["idx"][1] / results["png"][1]
    print(f"png after the first epoch: {ratio:.2f}x the speed of idx tensors (goal >= 0.8x); the first epoch cost "
          f"{results['png'][0] - results['png'][1]:.1f}s more than a cached one (decoding 60,000 PNGs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
