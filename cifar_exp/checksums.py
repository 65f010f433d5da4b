"""MD5 checks of data files, against the official archives' known values or a manifest:
a text file of `md5  path` lines, md5sum's format, paths relative to the data root (so
`md5sum -c` run in the data root checks it too)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from cifar_exp.errors import DataError

# The files of the official python-layout archives, as torchvision lists them. The binary
# archives' per-file MD5s are not published; check those with a manifest.
KNOWN_MD5 = {
    "cifar-10-batches-py/data_batch_1": "c99cafc152244af753f735de768cd75f",
    "cifar-10-batches-py/data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "cifar-10-batches-py/data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "cifar-10-batches-py/data_batch_4": "634d18415352ddfa80567beed471001a",
    "cifar-10-batches-py/data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "cifar-10-batches-py/test_batch": "40351d587109b95175f43aff81a1287e",
    "cifar-10-batches-py/batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    "cifar-100-python/train": "16019d7e3df5f24257cddd939b257f8d",
    "cifar-100-python/test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "cifar-100-python/meta": "7973b15100ade9c7d40fb424638fde48",
}
WRITE_HINT = "python -m cifar_exp.data --write-manifest FILE"
MAX_MANIFEST_BYTES = 1 << 20


def md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)  # a corruption check, not a security one
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(path: Path) -> dict[str, str]:
    """{relative path: md5} from a manifest; blank lines and # comments are skipped."""
    if not path.is_file():
        raise DataError(f"data.manifest={path}: no such file; write one with {WRITE_HINT}")
    if path.stat().st_size > MAX_MANIFEST_BYTES:  # a few hundred bytes a data set
        raise DataError(f"data.manifest={path}: {path.stat().st_size:,} bytes is not a "
                        f"manifest; write one with {WRITE_HINT}")
    try:
        text = path.read_text()
    except UnicodeDecodeError as error:
        raise DataError(f"data.manifest={path}: not a text file of 'md5  path' lines; write "
                        f"one with {WRITE_HINT}") from error
    expected: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        checksum, _, name = line.strip().partition(" ")
        name = name.strip().removeprefix("*")  # md5sum marks binary mode with '*'
        if len(checksum) != 32 or not name:
            raise DataError(f"{path}:{number}: not an 'md5  path' line: {line.strip()!r}")
        expected[name] = checksum.lower()
    return expected


def write_manifest(root: Path, files: Sequence[Path], path: Path) -> None:
    lines = [f"{md5(file)}  {file.relative_to(root).as_posix()}\n" for file in files]
    path.write_text("".join(lines))


def verify(root: Path, files: Sequence[Path], manifest: Path | None = None) -> None:
    """Check each of `files` (under `root`) against `manifest`, or against the official
    MD5s without one. A file that differs, or that has no checksum, is a DataError."""
    expected: Mapping[str, str] = read_manifest(manifest) if manifest else KNOWN_MD5
    source = str(manifest) if manifest else "the official MD5s"
    for file in files:
        name = file.relative_to(root).as_posix()
        if name not in expected:
            if manifest is None:
                raise DataError(
                    f"{file}: no official MD5 is known for {file.parent.name}/ (only for the "
                    f"python layouts); give data.manifest=<file>, written by {WRITE_HINT} "
                    f"from a copy you trust")
            raise DataError(f"{file}: not listed in {manifest}; add its line or rewrite the "
                            f"manifest with {WRITE_HINT}")
        actual = md5(file)
        if actual != expected[name]:
            raise DataError(
                f"{file}: MD5 {actual} differs from {expected[name]} in {source}; the file "
                f"is corrupt or another copy: replace it (or, if this copy is the one you "
                f"mean, rewrite the manifest with {WRITE_HINT})")
