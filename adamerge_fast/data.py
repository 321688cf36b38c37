"""Unlabeled data for AdaMerging from files: image folders, tensor files, text files.

AdaMerging needs only the inputs of each task (its test set, unlabeled). :func:`load_task_data` turns one path
into a deterministic, cycled-by-the-optimizer ``DataLoader``:

- a directory of images (searched recursively; ``.jpg .jpeg .png .bmp .gif .webp .tif .tiff``); labels are
  never read. Images go through ``transform`` (e.g. open_clip's eval preprocess) or :class:`ImageTransform`
  (resize shorter side, center crop, scale to [0, 1], normalize — PIL and torch only, no torchvision);
- a ``.pt``/``.pth`` file (loaded with ``weights_only=True``) or ``.npy`` file holding an input tensor
  ``[N, ...]`` (or a dict with one of the keys ``inputs``/``x``/``images``/``data``, or a tuple whose first item
  is the inputs); a ``.safetensors`` file with one of those keys;
- a ``.txt`` file for language models: one example per line, tokenized with ``tokenizer`` and padded to a
  fixed ``max_length`` (so every task's batch has the same shape and ``task_batching="concat"`` works).

Shuffling uses a seeded generator, so a run (and a resumed run) sees the same batches in the same order. The
loaders can skip batches without reading them (``skip_batches``): a resumed run fast-forwards by drawing the skipped
batches' indices only, never decoding their images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler, TensorDataset

from .io import check_readable

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_TENSOR_KEYS = ("inputs", "x", "images", "data", "input_ids")


class ImageTransform:
    """PIL image -> ``[3, size, size]`` float tensor: RGB, resize the shorter side to ``size`` (bicubic), center
    crop, scale to [0, 1], normalize by ``mean``/``std`` (CLIP's by default). No torchvision needed."""

    def __init__(self, size: int = 224, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        self.size = int(size)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, img) -> torch.Tensor:
        from PIL import Image

        img = img.convert("RGB")
        w, h = img.size
        s = self.size / min(w, h)
        nw, nh = max(self.size, round(w * s)), max(self.size, round(h * s))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(self.size, self.size, 3)
        x = x.permute(2, 0, 1).float() / 255.0
        return (x - self.mean) / self.std


class ImageFolder(Dataset):
    """Every image file under ``root`` (recursive, sorted), transformed; no labels."""

    def __init__(self, root, transform: Callable | None = None, *, what: str = "task"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: image folder not found")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise ValueError(f"{what}: no images ({', '.join(IMAGE_SUFFIXES)}) found under {self.root}")
        self.transform = transform or ImageTransform()

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as img:
            return self.transform(img)


def load_tensor(path, *, what: str = "task") -> torch.Tensor:
    """The input tensor ``[N, ...]`` stored in a ``.pt``/``.pth``/``.npy``/``.safetensors`` file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: data file not found")
    suf = p.suffix.lower()
    if suf == ".npy":
        import numpy as np

        try:
            obj = torch.from_numpy(np.load(p, allow_pickle=False))
        except ValueError as e:
            raise ValueError(f"{p}: not a plain numpy array file ({e})") from None
    elif suf == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(p))
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(
                f"{p}: cannot be read as a tensor file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from None
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], torch.Tensor):
        obj = obj[0]
    if isinstance(obj, dict):
        key = next((k for k in _TENSOR_KEYS if k in obj), None)
        if key is None and len(obj) == 1:
            key = next(iter(obj))
        if key is None:
            raise ValueError(
                f"{p}: a dict without an inputs tensor (expected one of the keys {', '.join(_TENSOR_KEYS)})"
            )
        obj = obj[key]
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{p}: expected a tensor of inputs, found {type(obj).__name__}")
    if obj.dim() == 0 or obj.shape[0] == 0:
        raise ValueError(f"{what}: {p} holds no examples (shape {list(obj.shape)})")
    if obj.is_floating_point() and obj.dtype != torch.float32:
        obj = obj.float()
    return obj


class TextLines(Dataset):
    """One example per non-empty line of a text file, tokenized to ``max_length`` (padded, truncated).
    Items are ``{"input_ids": [L], "attention_mask": [L]}``."""

    def __init__(self, path, tokenizer, max_length: int = 64, *, what: str = "task"):
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: text file not found")
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not lines:
            raise ValueError(f"{what}: {p} has no non-empty lines")
        if getattr(tokenizer, "pad_token", "x") is None:
            tokenizer.pad_token = tokenizer.eos_token
        enc = tokenizer(lines, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        self.input_ids = enc["input_ids"]
        self.attention_mask = enc["attention_mask"]

    def __len__(self):
        return self.input_ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i]}


class _SkippingBatchSampler(Sampler[list[int]]):
    """A batch sampler whose next epoch first drops ``skip`` batches: their indices are drawn (so the shuffling stays
    that of an uninterrupted run) but not yielded, so the DataLoader reads none of their examples."""

    def __init__(self, batch_sampler: BatchSampler):
        self.batch_sampler = batch_sampler
        self.skip = 0

    def __iter__(self):
        skip, self.skip = self.skip, 0
        for i, batch in enumerate(self.batch_sampler):
            if i >= skip:
                yield batch

    def __len__(self) -> int:
        return len(self.batch_sampler)


class ResumableLoader(DataLoader):
    """A DataLoader over an indexable dataset (seeded shuffling, last incomplete batch kept) that can skip batches
    without reading them: :meth:`skip_batches`."""

    def __init__(self, dataset: Dataset, batch_size: int, *, shuffle: bool = True, seed: int = 0, workers: int = 0):
        g = torch.Generator().manual_seed(seed)
        sampler = RandomSampler(dataset, generator=g) if shuffle else SequentialSampler(dataset)
        super().__init__(dataset, batch_sampler=_SkippingBatchSampler(BatchSampler(sampler, batch_size, False)),
                         generator=g, num_workers=workers)

    def skip_batches(self, n: int) -> None:
        """Make the next iterations continue ``n`` batches later than they would, drawing exactly the random numbers
        an iteration over those batches would (the base seed of each epoch's iterator, each epoch's permutation) but
        reading no example. Whole epochs are drawn in this process (no worker is started for them)."""
        per_epoch = len(self)
        if n <= 0 or per_epoch == 0:
            return
        epochs, rest = divmod(n, per_epoch)
        workers = self.num_workers
        try:
            self.num_workers = 0  # a skipped epoch starts no worker process
            for _ in range(epochs):
                self.batch_sampler.skip = per_epoch
                for _ in self:
                    raise AssertionError("a skipped epoch yielded a batch")
        finally:
            self.num_workers = workers
        self.batch_sampler.skip = rest


def loader(dataset: Dataset, batch_size: int, *, shuffle: bool = True, seed: int = 0, workers: int = 0) -> DataLoader:
    """A deterministic DataLoader (seeded shuffling; the last incomplete batch is kept) that can skip batches
    without reading them (:class:`ResumableLoader`)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    return ResumableLoader(dataset, batch_size, shuffle=shuffle, seed=seed, workers=workers)


def load_task_data(
    path,
    *,
    batch_size: int,
    transform: Callable | None = None,
    tokenizer=None,
    max_length: int = 64,
    seed: int = 0,
    shuffle: bool = True,
    workers: int = 0,
    task: str = "task",
) -> DataLoader:
    """One task's unlabeled data as a DataLoader: an image folder, a tensor file, or a text file (see the
    module docstring). Missing paths raise FileNotFoundError; a task with no examples raises ValueError."""
    what = f"task {task!r}"
    p = check_readable(path, f"data for {what}")  # FileNotFoundError, or PermissionError (never "not found")
    if p.is_dir():
        ds: Dataset = ImageFolder(p, transform, what=what)
    elif p.suffix.lower() == ".txt":
        if tokenizer is None:
            raise ValueError(
                f"{what}: {p} is a text file, but this model has no tokenizer (text data is for language models)"
            )
        ds = TextLines(p, tokenizer, max_length, what=what)
    else:
        ds = TensorDataset(load_tensor(p, what=what))
        return _unwrap(loader(ds, batch_size, shuffle=shuffle, seed=seed, workers=workers))
    return loader(ds, batch_size, shuffle=shuffle, seed=seed, workers=workers)


class _unwrap:
    """A TensorDataset loader yields 1-tuples; yield the tensor itself (and keep ``len``)."""

    def __init__(self, dl: DataLoader):
        self.dl = dl
        self.dataset = dl.dataset

    def __iter__(self):
        for (x,) in self.dl:
            yield x

    def __len__(self):
        return len(self.dl)

    def skip_batches(self, n: int) -> None:
        self.dl.skip_batches(n)


__all__ = [
    "ImageTransform",
    "ImageFolder",
    "TextLines",
    "load_tensor",
    "loader",
    "ResumableLoader",
    "load_task_data",
    "CLIP_MEAN",
    "CLIP_STD",
]
