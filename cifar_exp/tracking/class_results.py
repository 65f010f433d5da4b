"""A run's results per class, made from its final evaluation's predictions: what it
computes is pure (predictions and labels in, per-class counts and precision out); what it
writes is three files, logged under class_results/ of the run:

- per_class.csv: one row per class (the MLflow UI shows a CSV artifact as a table);
- confusion_matrix.png: true class against predicted class, counts in the cells;
- misclassified.png: the first misclassified test images, their true and predicted class.
"""

from __future__ import annotations

import csv
import math
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow.tracking import MlflowClient

ARTIFACT_FOLDER = "class_results"
TABLE_FILE = "per_class.csv"
CONFUSION_FILE = "confusion_matrix.png"
MISTAKES_FILE = "misclassified.png"
# The two shares first: the MLflow UI previews a CSV in columns wider than its page.
TABLE_COLUMNS = ("class", "precision", "predicted_precision", "images", "correct", "predicted")
GRID_COLUMNS = 8
MAX_MISTAKES = GRID_COLUMNS * GRID_COLUMNS
MAX_NUMBERED_CLASSES = 20  # beyond this (CIFAR-100) the cells are too small for counts
# Matplotlib is not thread-safe, and a packed sweep's jobs end in threads of one process.
_drawing = threading.Lock()


@dataclass(frozen=True)
class Predictions:
    """A final evaluation's predicted class for each test image, beside the images."""

    images: torch.Tensor  # N x 3 x H x W uint8, as the data set holds them (any device)
    labels: torch.Tensor  # N true classes
    predicted: torch.Tensor  # N predicted classes
    classes: Sequence[str]


@dataclass(frozen=True)
class ClassResults:
    classes: list[str]
    confusion: np.ndarray  # [true class, predicted class] -> how many test images

    @property
    def images(self) -> np.ndarray:
        return self.confusion.sum(axis=1)

    @property
    def correct(self) -> np.ndarray:
        return np.diagonal(self.confusion)

    @property
    def predicted(self) -> np.ndarray:
        return self.confusion.sum(axis=0)

    @property
    def precision(self) -> np.ndarray:
        """Per class, the share of its test images predicted right: the run's `precision`
        (@1) over that class's images alone; nan for a class with no test image."""
        return _share(self.correct, self.images)

    @property
    def predicted_precision(self) -> np.ndarray:
        """Per class, the share of the images predicted as it that are of it: low where
        other classes are taken for it; nan for a class never predicted."""
        return _share(self.correct, self.predicted)


def _share(part: np.ndarray, whole: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 is nan: nothing to share
        return part / whole


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor,
                     num_classes: int) -> np.ndarray:
    """[true class, predicted class] -> how many images, counted where the tensors are."""
    pairs = labels.long() * num_classes + predicted.long()
    counts = torch.bincount(pairs, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu().numpy()


def class_results(predictions: Predictions) -> ClassResults:
    classes = list(predictions.classes)
    return ClassResults(classes, confusion_matrix(predictions.predicted, predictions.labels,
                                                  len(classes)))


def first_mistakes(predictions: Predictions, limit: int = MAX_MISTAKES) -> list[int]:
    """The indices of the first `limit` misclassified images, in test-set order (the same
    images for every run on the same test set, so runs can be compared by eye)."""
    wrong = (predictions.predicted != predictions.labels).nonzero().flatten()
    return wrong[:limit].tolist()


def _number(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.4f}"  # empty: no image to measure on


def table_rows(results: ClassResults) -> list[list[str]]:
    """TABLE_COLUMNS for each class, in class order, as text."""
    columns = zip(results.classes, results.precision, results.predicted_precision,
                  results.images, results.correct, results.predicted, strict=True)
    return [[name, _number(precision), _number(predicted_precision), str(images),
             str(correct), str(predicted)]
            for name, precision, predicted_precision, images, correct, predicted in columns]


def markdown_table(results: ClassResults) -> str:
    """The per-class table as markdown, for the console (cifar-exp-evaluate)."""
    rows = [[cell or "-" for cell in row] for row in table_rows(results)]
    lines = [TABLE_COLUMNS, ["---"] * len(TABLE_COLUMNS), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def write_table(results: ClassResults, path: Path) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(TABLE_COLUMNS)
        writer.writerows(table_rows(results))


def read_precision(path: Path) -> dict[str, float]:
    """Class name -> precision, from a per_class.csv (classes with no test image left
    out)."""
    with path.open(newline="") as file:
        return {row["class"]: float(row["precision"]) for row in csv.DictReader(file)
                if row.get("precision")}


def _figure(**options: object) -> Figure:
    # Imported here: matplotlib adds half a second to a start, and only final results draw.
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **options)


def plot_confusion(results: ClassResults, path: Path) -> None:
    """The confusion matrix, each row coloured by its shares (classes with fewer test
    images compare), the counts written in the cells where they fit."""
    count = len(results.classes)
    side = max(5.0, 0.13 * count)
    figure = _figure(figsize=(side + 1, side))
    ax = figure.subplots()
    shares = np.nan_to_num(results.confusion / np.maximum(results.images, 1)[:, None])
    shown = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(shown, ax=ax, shrink=0.8, label="share of the true class's images")
    small = "x-small" if count <= MAX_NUMBERED_CLASSES else 4
    ax.set_xticks(range(count), results.classes, rotation=45, ha="right", fontsize=small)
    ax.set_yticks(range(count), results.classes, fontsize=small)
    ax.set(xlabel="predicted class", ylabel="true class",
           title=f"confusion matrix: {int(results.images.sum()):,} test images")
    if count <= MAX_NUMBERED_CLASSES:
        for (row, column), value in np.ndenumerate(results.confusion):
            ax.text(column, row, str(value), ha="center", va="center", fontsize="x-small",
                    color="white" if shares[row, column] > 0.5 else "black")
    figure.savefig(path, dpi=100)


def _mosaic(images: np.ndarray, columns: int, gap: tuple[int, int]) -> np.ndarray:
    """N x H x W x 3 images tiled `columns` to a row on white, `gap` (across, above)
    pixels around each: room for its title above it."""
    count, height, width, _ = images.shape
    rows = max(1, math.ceil(count / columns))
    cell_height, cell_width = height + gap[1], width + gap[0]
    mosaic = np.full((rows * cell_height, columns * cell_width, 3), 255, dtype=np.uint8)
    for index, image in enumerate(images):
        top, left = (index // columns) * cell_height + gap[1], (index % columns) * cell_width
        mosaic[top:top + height, left:left + width] = image
    return mosaic


def plot_mistakes(predictions: Predictions, path: Path) -> None:
    """Up to MAX_MISTAKES misclassified test images in a grid, each titled with its true
    class and, after the arrow, the predicted one. Drawn as one tiled image: an axes per
    image would take seconds to lay out."""
    indices = first_mistakes(predictions)
    chosen = torch.tensor(indices, dtype=torch.long, device=predictions.images.device)
    images = predictions.images[chosen].permute(0, 2, 3, 1).cpu().numpy()
    true, guessed = predictions.labels[chosen].tolist(), predictions.predicted[chosen].tolist()
    gap = (6, 13)  # pixels beside and above each image: two lines of title
    mosaic = _mosaic(images, GRID_COLUMNS, gap)
    scale = GRID_COLUMNS / mosaic.shape[1]  # inches per pixel: the figure 8 inches wide
    figure = _figure(figsize=(GRID_COLUMNS, 0.3 + mosaic.shape[0] * scale))
    ax = figure.subplots()
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    height, width = images.shape[1:3]
    names = predictions.classes
    for index, (label, guess) in enumerate(zip(true, guessed, strict=True)):
        row, column = divmod(index, GRID_COLUMNS)
        ax.text(column * (width + gap[0]) + width / 2, row * (height + gap[1]) + gap[1] - 1,
                f"{names[label]}\n→ {names[guess]}", ha="center", va="bottom", fontsize=6.5,
                linespacing=1.1)
    wrong = int((predictions.predicted != predictions.labels).sum())
    which = (f"the first {len(indices)} of {wrong:,}" if wrong > len(indices)
             else f"all {wrong}" if wrong else "none")
    figure.suptitle(f"misclassified test images, true → predicted: {which}", fontsize="small")
    figure.savefig(path, dpi=100)


def write_class_results(predictions: Predictions, folder: Path) -> list[Path]:
    """per_class.csv, confusion_matrix.png and misclassified.png into `folder`."""
    results = class_results(predictions)
    paths = [folder / TABLE_FILE, folder / CONFUSION_FILE, folder / MISTAKES_FILE]
    write_table(results, paths[0])
    with _drawing:
        plot_confusion(results, paths[1])
        plot_mistakes(predictions, paths[2])
    return paths


def log_class_results(client: MlflowClient, run_id: str, predictions: Predictions) -> None:
    """The three files, logged under class_results/ of run `run_id`."""
    with tempfile.TemporaryDirectory() as folder:
        write_class_results(predictions, Path(folder))
        client.log_artifacts(run_id, folder, ARTIFACT_FOLDER)


def logged_precision(client: MlflowClient, run_id: str) -> dict[str, float]:
    """Class name -> precision from run `run_id`'s class results; empty for a run without
    them (one from before they were logged, or one that did not finish)."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(run_id, f"{ARTIFACT_FOLDER}/{TABLE_FILE}", folder)
        except (MlflowException, OSError):
            return {}
        return read_precision(Path(path))
