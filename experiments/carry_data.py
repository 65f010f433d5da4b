"""Pack the CIFAR-10 binary files into a third of their size, losslessly, to carry them to a
machine with a small transfer limit; unpack them there, byte for byte, checked.

    python experiments/carry_data.py pack <data root> <packed folder>
    python experiments/carry_data.py unpack <packed folder> <data root>

The data copy was decoded from JPEGs (quality 75, 4:2:0), so its images are close to
what a JPEG of the same settings keeps: each file's images are tiled into one mosaic
(32-pixel tiles on the 16-pixel blocks of 4:2:0, so no block mixes two images) and saved
as one JPEG of those settings, and the difference to the real pixels (zero for most
pixels) is kept, xz-compressed, beside it. Unpacking decodes the mosaic, adds the
difference back and checks every file against the SHA-256 recorded when packing: a
decoder that rounds differently is refused, not trusted (carry the Pillow wheel of the
version that `manifest.json` names). The 184 MB of the seven files pack into about 35 MB.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import shutil
import sys
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

RECORD = 3073  # one label byte, then 3 planes of 32 x 32
SIDE = 32
COLUMNS = 250  # tiles per mosaic row: 10,000 images make a 8,000 x 1,280 mosaic
QUALITY = 75
MANIFEST = "manifest.json"


class CarryError(Exception):
    """What is wrong, in one line."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def mosaic(images: np.ndarray) -> np.ndarray:
    """N x 32 x 32 x 3 images (N a multiple of COLUMNS, padded by the caller) as one
    image of N / COLUMNS rows of COLUMNS tiles."""
    rows = len(images) // COLUMNS
    return (images.reshape(rows, COLUMNS, SIDE, SIDE, 3).transpose(0, 2, 1, 3, 4)
            .reshape(rows * SIDE, COLUMNS * SIDE, 3))


def tiles(picture: np.ndarray, count: int) -> np.ndarray:
    """The first `count` tiles of a mosaic, as N x 32 x 32 x 3."""
    rows = picture.shape[0] // SIDE
    images = (picture.reshape(rows, SIDE, COLUMNS, SIDE, 3).transpose(0, 2, 1, 3, 4)
              .reshape(rows * COLUMNS, SIDE, SIDE, 3))
    return images[:count]


def jpeg_of(images: np.ndarray) -> bytes:
    padded = np.zeros((-(-len(images) // COLUMNS) * COLUMNS, SIDE, SIDE, 3), np.uint8)
    padded[: len(images)] = images
    buffer = io.BytesIO()
    Image.fromarray(mosaic(padded)).save(buffer, "JPEG", quality=QUALITY, subsampling=2,
                                         optimize=True)
    return buffer.getvalue()


def decoded(jpeg: bytes, count: int) -> np.ndarray:
    return tiles(np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")), count)


def pack(root: Path, packed: Path) -> dict[str, dict]:
    """Write each `*.bin` of `root` as <name>.jpg, <name>.rest.xz and <name>.labels into
    `packed`, other files as they are, and the manifest; returns the manifest's files."""
    binaries = sorted(root.glob("*.bin"))
    if not binaries:
        raise CarryError(f"{root}: no *.bin files (give the cifar-10-batches-bin folder)")
    packed.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict] = {}
    for path in binaries:
        data = path.read_bytes()
        if len(data) % RECORD:
            raise CarryError(f"{path}: {len(data)} bytes is not a whole number of "
                             f"{RECORD}-byte records")
        records = np.frombuffer(data, np.uint8).reshape(-1, RECORD)
        images = records[:, 1:].reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)
        jpeg = jpeg_of(images)
        # The rest, modulo 256: what the JPEG lost, exactly recoverable.
        rest = (images.astype(np.int16) - decoded(jpeg, len(images))).astype(np.uint8)
        (packed / f"{path.stem}.jpg").write_bytes(jpeg)
        (packed / f"{path.stem}.rest.xz").write_bytes(
            lzma.compress(rest.tobytes(), preset=9 | lzma.PRESET_EXTREME))
        (packed / f"{path.stem}.labels").write_bytes(records[:, 0].tobytes())
        files[path.name] = {"records": len(records), "sha256": sha256(data)}
    for path in sorted(root.iterdir()):
        if path.is_file() and path.suffix != ".bin":
            shutil.copy2(path, packed / path.name)
    manifest = {"pillow": PIL.__version__, "quality": QUALITY, "files": files}
    (packed / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return files


def unpack(packed: Path, root: Path) -> list[str]:
    """Rebuild every file of the manifest into `root`, checked; returns their names."""
    manifest_path = packed / MANIFEST
    if not manifest_path.is_file():
        raise CarryError(f"{packed}: no {MANIFEST} (pack the data with this script first)")
    manifest = json.loads(manifest_path.read_text())
    root.mkdir(parents=True, exist_ok=True)
    for name, entry in manifest["files"].items():
        stem, count = Path(name).stem, entry["records"]
        images = decoded((packed / f"{stem}.jpg").read_bytes(), count)
        rest = np.frombuffer(lzma.decompress((packed / f"{stem}.rest.xz").read_bytes()),
                             np.uint8).reshape(images.shape)
        pixels = (images + rest).astype(np.uint8)  # uint8 arithmetic wraps, as packed
        labels = np.frombuffer((packed / f"{stem}.labels").read_bytes(), np.uint8)
        records = np.concatenate([labels[:, None], pixels.transpose(0, 3, 1, 2)
                                  .reshape(count, -1)], axis=1)
        data = records.tobytes()
        if sha256(data) != entry["sha256"]:
            raise CarryError(f"{name}: rebuilt bytes differ from the packed file (Pillow "
                             f"{PIL.__version__} decodes otherwise than "
                             f"{manifest['pillow']}); install Pillow=={manifest['pillow']}")
        (root / name).write_bytes(data)
    for path in sorted(packed.iterdir()):
        if path.suffix not in (".jpg", ".xz", ".labels") and path.name != MANIFEST:
            shutil.copy2(path, root / path.name)
    return list(manifest["files"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python experiments/carry_data.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["pack", "unpack"])
    parser.add_argument("source", type=Path, help="the data folder (pack) or packed folder")
    parser.add_argument("destination", type=Path)
    args = parser.parse_args(argv)
    try:
        done = (pack if args.action == "pack" else unpack)(args.source, args.destination)
    except CarryError as error:
        parser.exit(2, f"error: {error}\n")
    size = sum(path.stat().st_size for path in args.destination.iterdir())
    print(f"{args.action}ed {len(done)} files into {args.destination} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    sys.exit(main())
