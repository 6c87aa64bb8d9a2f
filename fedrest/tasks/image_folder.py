"""The built-in ``image-folder`` task: your images in class folders, a torchvision architecture with random weights.

Layout (torchvision's ``ImageFolder``): ``DATA_DIR/<class name>/<image>.png|jpg|...``, any size, RGB or grayscale.
Class indices follow the sorted folder names; an empty class folder is allowed (a node may hold no example of a
class), a missing one changes the class list and is refused at registration. Every image is converted to
``--image-channels`` (3: RGB, 1: grayscale), resized to ``--image-size`` squared and kept as uint8 (C, H, W); each
batch is normalised on the training device, ``(x / 255 - mean) / std`` per channel (``--normalize-mean/-std``).
The decoded uint8 images are cached in memory after the first pass when they fit in ``--cache-bytes``.

Models: any torchvision classification builder (``--model resnet18`` by default, ``mobilenet_v3_small``,
``efficientnet_b0``...) built with ``weights=None`` and ``num_classes`` from the folders (nothing is downloaded),
or ``simple_cnn`` for 1x28x28 images.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fedrest.tasks.api import Task, TaskError
from fedrest.tasks.data import DatasetData, default_data_workers

log = logging.getLogger("fl.data")

DEFAULT_MODEL = "resnet18"


def _open_rgb(path: str):
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def _open_gray(path: str):
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert("L")


def per_channel(text: str, channels: int, what: str) -> list[float]:
    """``"0.5"`` or ``"0.485,0.456,0.406"`` as ``channels`` floats. Raises TaskError for another count."""
    values = [float(v) for v in text.split(",")]
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise TaskError(f"--{what}: give 1 or {channels} comma-separated values (one per channel), got {text!r}")
    return values


class Normalize:
    """uint8 (B, C, H, W) -> float32 ``(x / 255 - mean) / std`` per channel, on the batch's device."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        self.mean, self.std = mean, std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x.to(torch.float32) / 255.0 - mean) / std


def _model_builder(model_name: str, channels: int, size: int):
    from model import MODELS, build_model

    if model_name in MODELS:
        if (channels, size) != (1, 28):
            raise TaskError(f"--model {model_name} takes 1x28x28 images: add --image-channels 1 --image-size 28")
        return lambda num_classes: build_model(model_name, num_classes=num_classes)
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if model_name not in known:
        raise TaskError(f"--model {model_name!r} is neither simple_cnn nor a torchvision classification model "
                        f"(for example resnet18, resnet50, mobilenet_v3_small, efficientnet_b0; {len(known)} in "
                        "torchvision.models.list_models())")
    if channels != 3:
        raise TaskError(f"--model {model_name} takes RGB images: use --image-channels 3")
    return lambda num_classes: torchvision.models.get_model(model_name, weights=None, num_classes=num_classes)


def image_folder_task(cfg) -> Task:
    """The task for ``cfg`` (image_size, image_channels, normalize_mean/std, model, classes, data_workers,
    cache_bytes). Raises :class:`TaskError` for settings that do not fit together."""
    from torchvision import transforms

    model_name, channels, size = cfg.model or DEFAULT_MODEL, cfg.image_channels, cfg.image_size
    if channels not in (1, 3):
        raise TaskError(f"--image-channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    mean = per_channel(cfg.normalize_mean, channels, "normalize-mean")
    std = per_channel(cfg.normalize_std, channels, "normalize-std")
    if any(s <= 0 for s in std):
        raise TaskError(f"--normalize-std must be > 0, got {cfg.normalize_std!r}")
    builder = _model_builder(model_name, channels, size)
    pipeline = transforms.Compose([transforms.Resize((size, size)), transforms.PILToTensor()])
    opener = _open_gray if channels == 1 else _open_rgb

    def build_model():
        if task.classes is None:
            raise TaskError("image-folder: the class names are not known yet: the coordinator reads them from its "
                            "--data-dir folder; with --no-eval give them with --classes NAME,NAME,...")
        return builder(len(task.classes))

    def load(ctx):
        return _load_folder(Path(ctx.data_dir), pipeline, opener, cfg, task)

    task = Task("image-folder", "built-in", build_model, load_train_data=load, load_test_data=load,
                model_name=model_name, transform=Normalize(mean, std),
                details={"model": model_name, "image_size": size, "image_channels": channels,
                         "normalize_mean": mean, "normalize_std": std})
    if cfg.classes:
        task.classes = [c.strip() for c in cfg.classes.split(",") if c.strip()]
    return task


def _load_folder(folder: Path, pipeline, opener, cfg, task: Task) -> DatasetData:
    from torchvision.datasets import ImageFolder

    if not folder.is_dir():
        raise TaskError(f"image-folder: --data-dir {folder} is not a folder; give the folder that holds one "
                        "sub-folder of images per class")
    try:
        dataset = ImageFolder(str(folder), transform=pipeline, loader=opener, allow_empty=True)
    except FileNotFoundError as exc:  # no class folders, or no image at all
        raise TaskError(f"image-folder: {folder}: {exc}; it must hold one sub-folder of images per class "
                        "(DATA_DIR/<class>/<image>.png)") from None
    if len(dataset) == 0:
        raise TaskError(f"image-folder: {folder} holds class folders ({', '.join(dataset.classes[:5])}...) but no "
                        "images (.png, .jpg, .jpeg, .bmp, .tif, .webp...)")
    if task.classes is not None and task.classes != dataset.classes:
        raise TaskError(f"image-folder: the folders of {folder} ({', '.join(dataset.classes)}) are not the classes "
                        f"given with --classes ({', '.join(task.classes)})")
    counts = torch.bincount(torch.as_tensor(dataset.targets), minlength=len(dataset.classes)).tolist()
    log.info("image folder %s: %d images in %d classes (%s)", folder, len(dataset), len(dataset.classes),
             ", ".join(f"{c}: {n}" for c, n in list(zip(dataset.classes, counts))[:10])
             + (" ..." if len(counts) > 10 else ""))
    workers = default_data_workers() if cfg.data_workers is None else cfg.data_workers
    return DatasetData(dataset, workers, cfg.cache_bytes, transform=task.transform,
                       description=f"image folder {folder}")
