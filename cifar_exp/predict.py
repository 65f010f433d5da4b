"""Classify your own images with a trained model: the top classes and their probabilities.

    cifar-exp-predict cat.jpg plane.png --run <MLflow run id> [--top-k 3]
    cifar-exp-predict photos/*.jpg --checkpoint outputs/<date>/<time>/checkpoint.pt
    (or python -m cifar_exp.predict ...)

Any PNG or JPEG, of any size: each is read as RGB and resized to 32 x 32 (as CIFAR's
images are), then goes through the evaluation preprocessing of the model's run, the
network and a softmax: the same computation as the run's logged model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from cifar_exp.errors import CommandParser, UserError, refused
from cifar_exp.quick_exit import run_and_exit
from cifar_exp.serving.source import add_source_arguments

if TYPE_CHECKING:
    import numpy as np

    from cifar_exp.serving.trained import Trained


def read_image(path: Path) -> np.ndarray:
    """An image file as uint8 32 x 32 x 3 (RGB), resized with antialiasing."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from cifar_exp.serving.classifier import IMAGE_SIDE

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except FileNotFoundError as error:
        raise UserError(f"{path}: no such image file") from error
    except (UnidentifiedImageError, OSError) as error:
        raise UserError(f"{path}: not an image this reads (PNG or JPEG)") from error
    if rgb.size != (IMAGE_SIDE, IMAGE_SIDE):
        rgb = rgb.resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.LANCZOS)
    return np.array(rgb, dtype=np.uint8)  # a copy torch may write to


def predict(images: list[Path], source: Trained, top_k: int) -> list[list[tuple[str, float]]]:
    """The `top_k` (class, probability) pairs of each image, most likely first."""
    import numpy as np
    import torch

    from cifar_exp.serving.classifier import Classifier

    batch = torch.as_tensor(np.stack([read_image(path) for path in images]))
    classifier = Classifier(source.model, source.augmentation).eval()
    with torch.no_grad():
        probabilities = classifier(batch.to(source.data.train_images.device)).cpu()
    best = probabilities.topk(min(top_k, probabilities.shape[1]), dim=1)
    classes = source.data.classes
    return [[(classes[index], value) for value, index in zip(values.tolist(), indices.tolist(),
                                                             strict=True)]
            for values, indices in zip(best.values, best.indices, strict=True)]


def argument_parser() -> argparse.ArgumentParser:
    """The command line of cifar-exp-predict (python -m cifar_exp.predict)."""
    parser = CommandParser(prog="cifar-exp-predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", type=Path, help="PNG or JPEG files")
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
        # Here, not above: torch and MLflow are not for --help.
        from cifar_exp.serving import trained as trained_models

        overrides = [f"device={args.device}"]
        source = (trained_models.from_run(args.run, args.tracking_uri, overrides) if args.run
                  else trained_models.from_checkpoint(args.checkpoint, overrides))
        for path, ranked in zip(args.images, predict(args.images, source, args.top_k),
                                strict=True):
            print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in ranked))
    except UserError as error:
        return refused(error)
    return 0


def command() -> NoReturn:
    """`python -m cifar_exp.predict` and `cifar-exp-predict`: main(), then a quick
    exit (cifar_exp.quick_exit)."""
    run_and_exit(main)


if __name__ == "__main__":
    command()
