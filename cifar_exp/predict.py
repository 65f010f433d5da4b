"""Classify your own images with a trained model: the top classes and their probabilities.

    cifar-exp-predict cat.jpg plane.png --run <MLflow run id> [--top-k 3]
    cifar-exp-predict photos/*.jpg --checkpoint outputs/<date>/<time>/checkpoint.pt
    cifar-exp-predict photos/ --checkpoint ...    (a folder: its PNG and JPEG files)
    (or python -m cifar_exp.predict ...)

Any PNG or JPEG up to 4096 x 4096 pixels: each is read as RGB and resized to 32 x 32 (as
CIFAR's images are), then goes through the evaluation preprocessing of the model's run,
the network and a softmax: the same computation as the run's logged model. Files are
read, classified and printed 256 at a time, so memory stays flat however many there are."""

from __future__ import annotations

import argparse
import itertools
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from cifar_exp.errors import CommandParser, UserError, refused
from cifar_exp.quick_exit import run_and_exit
from cifar_exp.serving.source import add_source_arguments

if TYPE_CHECKING:
    import numpy as np
    import torch

    from cifar_exp.serving.trained import Trained

BATCH_FILES = 256  # files read and classified at a time: memory stays flat
# The largest side read. A bigger image is refused from its header, before it is decoded:
# a small file may declare 50,000 x 50,000 pixels (a decompression bomb).
MAX_SIDE = 4096
SUFFIXES = (".png", ".jpg", ".jpeg")  # the files taken from a folder

Ranked = list[tuple[str, float]]  # (class, probability), most likely first


def read_image(path: Path) -> np.ndarray:
    """An image file as uint8 32 x 32 x 3 (RGB), resized with antialiasing."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from cifar_exp.serving.classifier import IMAGE_SIDE

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:  # reads the header only
                if max(image.size) > MAX_SIDE:
                    raise too_large(path)
                rgb = image.convert("RGB")
    except FileNotFoundError as error:
        raise UserError(f"{path}: no such image file") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise too_large(path) from error  # Pillow's own limit, met while opening
    except (UnidentifiedImageError, OSError, ValueError) as error:  # ValueError: bad chunks
        raise UserError(f"{path}: not an image this reads (PNG or JPEG)") from error
    if rgb.size != (IMAGE_SIDE, IMAGE_SIDE):
        rgb = rgb.resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.LANCZOS)
    return np.array(rgb, dtype=np.uint8)  # a copy torch may write to


def too_large(path: Path) -> UserError:
    return UserError(f"{path}: larger than {MAX_SIDE} x {MAX_SIDE} pixels, the most this "
                     f"reads; shrink it first")


def check_named(paths: list[Path]) -> None:
    """Refuse a name that is no file or folder, or a folder without image files: before
    the model loads, so that a mistyped name is said at once."""
    for path in paths:
        if not path.exists():
            raise UserError(f"{path}: no such image file or folder")
        if path.is_dir() and not any(child.suffix.lower() in SUFFIXES
                                     for child in path.iterdir()):
            raise UserError(f"{path}: a folder without PNG or JPEG files "
                            f"({', '.join(SUFFIXES)})")


def image_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Each file named, and a folder's PNG and JPEG files in name order."""
    for path in paths:
        if path.is_dir():
            yield from sorted(child for child in path.iterdir()
                              if child.suffix.lower() in SUFFIXES)
        else:
            yield path


def predict(images: Iterable[Path], source: Trained, top_k: int,
            batch_files: int = BATCH_FILES) -> Iterator[tuple[Path, Ranked]]:
    """Each image with its `top_k` (class, probability) pairs, in order, `batch_files`
    files at a time: only one batch is in memory."""
    import numpy as np
    import torch

    from cifar_exp.serving.classifier import Classifier

    classifier = Classifier(source.model, source.augmentation).eval()
    device = source.data.train_images.device
    files = iter(images)
    while batch := list(itertools.islice(files, batch_files)):
        pixels = torch.as_tensor(np.stack([read_image(path) for path in batch]))
        with torch.no_grad():
            probabilities = classifier(pixels.to(device)).cpu()
        yield from zip(batch, ranked(probabilities, source.data.classes, top_k), strict=True)


def ranked(probabilities: torch.Tensor, classes: list[str], top_k: int) -> list[Ranked]:
    """The `top_k` (class, probability) pairs of each row, most likely first."""
    best = probabilities.topk(min(top_k, probabilities.shape[1]), dim=1)
    return [[(classes[index], value) for value, index in zip(values.tolist(), indices.tolist(),
                                                             strict=True)]
            for values, indices in zip(best.values, best.indices, strict=True)]


def argument_parser() -> argparse.ArgumentParser:
    """The command line of cifar-exp-predict (python -m cifar_exp.predict)."""
    parser = CommandParser(prog="cifar-exp-predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", type=Path,
                        help="PNG or JPEG files, or folders of them")
    add_source_arguments(parser)
    parser.add_argument("--top-k", type=int, default=3, help="classes to show (default 3)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = argument_parser()
        args = parser.parse_args(argv)
        if args.top_k < 1:
            parser.error("--top-k must be at least 1")
        check_named(args.images)
        # Here, not above: torch and MLflow are not for --help.
        from cifar_exp.serving import trained as trained_models

        overrides = [f"device={args.device}"]
        source = (trained_models.from_run(args.run, args.tracking_uri, overrides) if args.run
                  else trained_models.from_checkpoint(args.checkpoint, overrides))
        print_predictions(predict(image_files(args.images), source, args.top_k))
    except UserError as error:
        return refused(error)
    return 0


def print_predictions(predictions: Iterable[tuple[Path, Ranked]]) -> None:
    """A line per image, `path: class p, class p, ...`, each batch's as it is classified
    (flushed: through a pipe too)."""
    for path, classes in predictions:
        print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in classes), flush=True)


def command() -> NoReturn:
    """`python -m cifar_exp.predict` and `cifar-exp-predict`: main(), then a quick
    exit (cifar_exp.quick_exit)."""
    run_and_exit(main)


if __name__ == "__main__":
    command()
