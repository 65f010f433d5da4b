"""Read CIFAR-10/100 from the official binary or python layouts into uint8 tensors."""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import os
import pickle
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from cifar_exp import checksums
from cifar_exp.config import DATA_ROOT_ENV, DEFAULT_DATA_ROOT
from cifar_exp.errors import ConfigError, DataError, refuse
from cifar_exp.quick_exit import run_and_exit

log = logging.getLogger(__name__)
IMAGE_SHAPE = (3, 32, 32)
IMAGE_BYTES = 3 * 32 * 32


@dataclass(frozen=True)
class CifarSpec:
    """Where one data set's files live in each official layout."""

    title: str
    num_classes: int
    binary_folder: str
    binary_train: tuple[str, ...]
    binary_test: str
    binary_label_offset: int  # CIFAR-100 records start with <coarse><fine>
    binary_meta: str
    python_folder: str
    python_train: tuple[str, ...]
    python_test: str
    python_label_key: str
    python_meta: str
    python_meta_key: str
    torchvision_class: str

    def files(self, folder: Path) -> list[Path]:
        """The files of the layout in `folder` (training batches, test batch, class names)."""
        if folder.name == self.binary_folder:
            names = (*self.binary_train, self.binary_test, self.binary_meta)
        else:
            names = (*self.python_train, self.python_test, self.python_meta)
        return [folder / name for name in names]


SPECS = {
    "cifar10": CifarSpec(
        title="CIFAR-10",
        num_classes=10,
        binary_folder="cifar-10-batches-bin",
        binary_train=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        binary_test="test_batch.bin",
        binary_label_offset=0,
        binary_meta="batches.meta.txt",
        python_folder="cifar-10-batches-py",
        python_train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        python_test="test_batch",
        python_label_key="labels",
        python_meta="batches.meta",
        python_meta_key="label_names",
        torchvision_class="CIFAR10",
    ),
    "cifar100": CifarSpec(
        title="CIFAR-100",
        num_classes=100,
        binary_folder="cifar-100-binary",
        binary_train=("train.bin",),
        binary_test="test.bin",
        binary_label_offset=1,
        binary_meta="fine_label_names.txt",
        python_folder="cifar-100-python",
        python_train=("train",),
        python_test="test",
        python_label_key="fine_labels",
        python_meta="meta",
        python_meta_key="fine_label_names",
        torchvision_class="CIFAR100",
    ),
}


@dataclass
class CifarData:
    """A whole data set in memory: images N x 3 x 32 x 32 uint8, labels int64."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to(self, device: torch.device | str) -> CifarData:
        """The same data set with every tensor on `device` (moved once, used every step)."""
        return CifarData(
            train_images=self.train_images.to(device),
            train_labels=self.train_labels.to(device),
            test_images=self.test_images.to(device),
            test_labels=self.test_labels.to(device),
            classes=self.classes,
        )

    def first_test_images(self, count: int) -> CifarData:
        """The same data set with only the first `count` test images (all if fewer)."""
        return replace(self, test_images=self.test_images[:count],
                       test_labels=self.test_labels[:count])


def limit_test_set(data: CifarData, count: int) -> CifarData:
    """`data` with only its first `count` test images (`eval_images`), said in the log."""
    available = data.test_images.shape[0]
    if count > available:
        raise ConfigError(f"eval_images={count} is more than the {available} test images; "
                          f"use at most {available}, or null for the whole test set")
    log.info("evaluating on the first %d of the %d test images (eval_images=%d): precision "
             "is not comparable with a run on the whole test set", count, available, count)
    return data.first_test_images(count)


def default_root() -> str:
    """The data folder used when none is configured: $CIFAR_EXP_DATA, else ./data."""
    return os.environ.get(DATA_ROOT_ENV, DEFAULT_DATA_ROOT)


def load_cifar(name: str = "cifar10", root: str | os.PathLike | None = None,
               download: bool = False, verify: bool = False,
               manifest: str | os.PathLike | None = None) -> CifarData:
    """Load data set `name` (cifar10 | cifar100) from `root`, the folder that holds
    its binary or python layout; with `download`, fetch the official archive if absent.
    With `verify`, check the files' MD5s first: against `manifest` (which implies
    `verify`), else against the official archive's."""
    spec = _spec(name)
    root = _root(root)
    binary, python = root / spec.binary_folder, root / spec.python_folder
    if download and not binary.is_dir() and not python.is_dir():
        _download(spec, root)
    folder = _locate(spec, root)
    if verify or manifest is not None:
        files = [_require(path, spec) for path in spec.files(folder)]
        checksums.verify(root, files, Path(manifest).expanduser() if manifest else None)
    data = _load_binary(spec, folder) if folder == binary else _load_python(spec, folder)
    log.info("%s: %d training and %d test images from %s", spec.title,
             data.train_labels.numel(), data.test_labels.numel(), folder)
    return data


def data_files(name: str = "cifar10", root: str | os.PathLike | None = None) -> list[Path]:
    """The files load_cifar reads from `root` (the binary layout where both are there)."""
    spec = _spec(name)
    return spec.files(_locate(spec, _root(root)))


def split_files(name: str = "cifar10",
                root: str | os.PathLike | None = None) -> dict[str, list[Path]]:
    """The files of each split: {"train": the training batches, "test": the test batch}."""
    *train, test, _meta = data_files(name, root)
    return {"train": train, "test": [test]}


@functools.cache
def _file_digest(path: Path, size: int, modified: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def content_digest(files: list[Path]) -> str:
    """A short digest of the files' contents (SHA-256, cut to 16 hex digits), each file read
    once per process however often it is asked for (a sweep's jobs)."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(_file_digest(path.resolve(), stat.st_size, stat.st_mtime_ns).encode())
    return digest.hexdigest()[:16]


def _spec(name: str) -> CifarSpec:
    if name not in SPECS:
        raise DataError(f"unknown data set {name!r}; choose one of {sorted(SPECS)}")
    return SPECS[name]


def _root(root: str | os.PathLike | None) -> Path:
    return Path(root if root is not None else default_root()).expanduser().resolve()


def _locate(spec: CifarSpec, root: Path) -> Path:
    """The layout folder under `root`: binary where both are present."""
    for folder in (root / spec.binary_folder, root / spec.python_folder):
        if folder.is_dir():
            return folder
    raise DataError(
        f"{spec.title} not found: no {spec.binary_folder}/ or {spec.python_folder}/ in {root}; "
        f"set data.root (or CIFAR_EXP_DATA) to the folder that holds one, "
        f"or add data.download=true to fetch it"
    )


def _download(spec: CifarSpec, root: Path) -> None:
    import torchvision.datasets  # imported here: only downloads need it

    dataset_class = getattr(torchvision.datasets, spec.torchvision_class)
    created = not root.exists()
    try:
        for train in (True, False):  # the archive holds both; torchvision verifies its md5
            dataset_class(str(root), train=train, download=True)
    except (OSError, RuntimeError) as error:
        if created:  # offline, say: leave no empty (or half-fetched) data folder behind
            shutil.rmtree(root, ignore_errors=True)
        raise DataError(
            f"could not download {spec.title} into {root}: {error}; check the network, "
            f"or place {spec.binary_folder}/ or {spec.python_folder}/ there by hand"
        ) from error


def _require(path: Path, spec: CifarSpec) -> Path:
    if not path.is_file():
        raise DataError(
            f"{path}: missing, so {spec.title} in {path.parent} is incomplete; "
            f"restore the file or fetch the data set again (data.download=true into an empty root)"
        )
    return path


def _check_labels(labels: np.ndarray, spec: CifarSpec, path: Path) -> None:
    """Every label a class index, 0..num_classes - 1 (a python-layout file's are signed)."""
    if not labels.size:
        return
    bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
    if not 0 <= bad < spec.num_classes:
        raise DataError(
            f"{path}: label {bad} is out of range 0..{spec.num_classes - 1}; "
            f"the file is corrupt or not {spec.title}"
        )


def _read_binary_batch(path: Path, spec: CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    record = spec.binary_label_offset + 1 + IMAGE_BYTES
    size = path.stat().st_size
    if size == 0 or size % record:
        raise DataError(
            f"{path}: {size} bytes is not a whole number of {record}-byte records; "
            f"the file is truncated or not {spec.title} binary data, replace it"
        )
    records = np.fromfile(path, dtype=np.uint8).reshape(-1, record)
    labels = records[:, spec.binary_label_offset].astype(np.int64)
    _check_labels(labels, spec, path)
    images = records[:, spec.binary_label_offset + 1 :].reshape(-1, *IMAGE_SHAPE)
    return images, labels


def _load_binary(spec: CifarSpec, folder: Path) -> CifarData:
    train = [_read_binary_batch(_require(folder / f, spec), spec) for f in spec.binary_train]
    test = _read_binary_batch(_require(folder / spec.binary_test, spec), spec)
    meta = _require(folder / spec.binary_meta, spec)
    classes = [line.strip() for line in meta.read_text().splitlines() if line.strip()]
    return _assemble(train, test, classes, spec, meta)


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only what CIFAR's python-layout pickles hold: containers, strings, bytes and
    numpy arrays. Anything else (a function or class to call) is refused, so a malicious
    file dropped in place of a batch runs no code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3's protocol 2 spells a bytes literal
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path, spec: CifarSpec) -> dict[str, object]:
    try:
        with open(path, "rb") as file:
            content = _RestrictedUnpickler(file, encoding="bytes").load()
    except Exception as error:  # any parse failure means the same thing to the user
        raise DataError(
            f"{path}: not a {spec.title} python-layout file ({error}); replace it"
        ) from error
    if not isinstance(content, dict):
        raise DataError(f"{path}: holds a {type(content).__name__}, not a {spec.title} dict")
    # The official files were pickled by Python 2: their keys arrive as bytes.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in content.items()}


def _read_python_batch(path: Path, spec: CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    content = _unpickle(path, spec)
    missing = {"data", spec.python_label_key} - set(content)
    if missing:
        raise DataError(f"{path}: has no {sorted(missing)} entry; not a {spec.title} batch")
    data = np.asarray(content["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_BYTES:
        raise DataError(
            f"{path}: data is {data.dtype} {data.shape}, expected uint8 N x {IMAGE_BYTES}; "
            f"not a {spec.title} batch"
        )
    try:
        labels = np.asarray(content[spec.python_label_key], dtype=np.int64)
    except (ValueError, TypeError, OverflowError) as error:
        raise DataError(f"{path}: its labels are not whole numbers ({error}); the file is "
                        f"corrupt or not {spec.title}") from error
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {labels.size} labels for {data.shape[0]} images")
    _check_labels(labels, spec, path)
    return data.reshape(-1, *IMAGE_SHAPE), labels


def _load_python(spec: CifarSpec, folder: Path) -> CifarData:
    train = [_read_python_batch(_require(folder / f, spec), spec) for f in spec.python_train]
    test = _read_python_batch(_require(folder / spec.python_test, spec), spec)
    meta_path = _require(folder / spec.python_meta, spec)
    names = _unpickle(meta_path, spec).get(spec.python_meta_key)
    if not isinstance(names, list):
        raise DataError(f"{meta_path}: has no {spec.python_meta_key} list")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return _assemble(train, test, classes, spec, meta_path)


def _assemble(train: list[tuple[np.ndarray, np.ndarray]], test: tuple[np.ndarray, np.ndarray],
              classes: list[str], spec: CifarSpec, meta: Path) -> CifarData:
    if len(classes) != spec.num_classes:
        raise DataError(
            f"{meta}: names {len(classes)} classes, {spec.title} has {spec.num_classes}"
        )
    return CifarData(
        train_images=torch.from_numpy(np.concatenate([images for images, _ in train])),
        train_labels=torch.from_numpy(np.concatenate([labels for _, labels in train])),
        test_images=torch.from_numpy(np.ascontiguousarray(test[0])),
        test_labels=torch.from_numpy(test[1]),
        classes=classes,
    )


def argument_parser() -> argparse.ArgumentParser:
    """The command line of python -m cifar_exp.data."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--name", choices=sorted(SPECS), default="cifar10")
    parser.add_argument("--root", default=None, help="default: $CIFAR_EXP_DATA, else ./data")
    parser.add_argument("--download", action="store_true", help="fetch the archive if absent")
    parser.add_argument("--verify", action="store_true",
                        help="check the files' MD5s (the official ones, or --manifest's)")
    parser.add_argument("--manifest", default=None, help="check against this manifest")
    parser.add_argument("--write-manifest", metavar="FILE", default=None,
                        help="write the MD5s of the data files found to FILE, then stop")
    return parser


def main(argv: list[str] | None = None) -> None:
    """`python -m cifar_exp.data [--download] [--verify] [--manifest FILE]`: check (or
    fetch) a data set and time its load; `--write-manifest FILE` writes its files' MD5s."""
    args = argument_parser().parse_args(argv)
    root = _root(args.root)
    start = time.perf_counter()
    try:
        if args.write_manifest:
            files = [_require(path, SPECS[args.name]) for path in data_files(args.name, root)]
            checksums.write_manifest(root, files, Path(args.write_manifest))
            print(f"wrote the MD5s of {len(files)} files under {root} to {args.write_manifest}")
            return
        data = load_cifar(args.name, root, args.download, args.verify, args.manifest)
    except DataError as error:
        refuse(error)
    seconds = time.perf_counter() - start
    checked = ", files verified" if args.verify or args.manifest else ""
    print(f"{SPECS[args.name].title} in {root}: {len(data.train_labels):,} training and "
          f"{len(data.test_labels):,} test images, {data.num_classes} classes, "
          f"loaded in {seconds:.2f} s{checked}")


if __name__ == "__main__":
    run_and_exit(main)
