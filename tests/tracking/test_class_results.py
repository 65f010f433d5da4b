"""A run's results per class: counts and precision from known predictions, the three files
they are written as, and their round trip through an MLflow store."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from cifar_exp.tracking.class_results import (
    TABLE_COLUMNS,
    ClassResults,
    Predictions,
    class_results,
    confusion_matrix,
    first_mistakes,
    log_class_results,
    logged_precision,
    markdown_table,
    read_precision,
    write_class_results,
    write_table,
)

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


def predictions(labels: list[int], predicted: list[int], classes: list[str]) -> Predictions:
    count = len(labels)
    images = torch.arange(count * 3 * 32 * 32).remainder(256).to(torch.uint8)
    return Predictions(images.reshape(count, 3, 32, 32), torch.tensor(labels),
                       torch.tensor(predicted), classes)


def test_the_confusion_matrix_counts_true_class_against_predicted_class():
    labels, predicted = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 1, 1, 0, 2])
    assert confusion_matrix(predicted, labels, 4).tolist() == [[1, 1, 0, 0],
                                                             [0, 2, 0, 0],
                                                             [1, 0, 1, 0],
                                                             [0, 0, 0, 0]]


def test_precision_per_class_is_the_share_of_its_images_predicted_right():
    results = class_results(predictions([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 0, 2],
                                        ["a", "b", "c", "d"]))
    assert results.images.tolist() == [2, 2, 2, 0]
    assert results.correct.tolist() == [1, 2, 1, 0]
    assert results.precision[:3].tolist() == [0.5, 1.0, 0.5]
    # Of the images predicted as a class, the share that are of it.
    assert results.predicted.tolist() == [2, 3, 1, 0]
    assert results.predicted_precision[:3].tolist() == pytest.approx([0.5, 2 / 3, 1.0])
    # Class d has no test image and is never predicted: nothing to measure.
    assert math.isnan(results.precision[3]) and math.isnan(results.predicted_precision[3])
    # The run's precision is the correct images over all of them.
    assert results.correct.sum() / results.images.sum() == 4 / 6


def test_the_first_mistakes_come_in_test_set_order_up_to_the_limit():
    labelled = predictions([0, 1, 2, 3, 0, 1, 2], [1, 1, 0, 3, 2, 0, 2], CIFAR10)
    assert first_mistakes(labelled) == [0, 2, 4, 5]
    assert first_mistakes(labelled, limit=2) == [0, 2]


def test_the_table_has_a_row_per_class_and_reads_back(tmp_path):
    results = ClassResults(["a", "b"], np.array([[3, 1], [0, 0]]))
    write_table(results, tmp_path / "per_class.csv")
    with (tmp_path / "per_class.csv").open(newline="") as file:
        rows = list(csv.reader(file))
    assert rows == [list(TABLE_COLUMNS), ["a", "0.7500", "1.0000", "4", "3", "3"],
                    ["b", "", "0.0000", "0", "0", "1"]]
    assert read_precision(tmp_path / "per_class.csv") == {"a": 0.75}  # b: no test image
    printed = markdown_table(results).splitlines()
    assert printed[0] == "| " + " | ".join(TABLE_COLUMNS) + " |"
    assert printed[3] == "| b | - | 0.0000 | 0 | 0 | 1 |"


def test_the_three_files_are_written(tmp_path):
    labels = [index % 10 for index in range(100)]
    predicted = [label if index % 4 else (label + 1) % 10 for index, label in enumerate(labels)]
    paths = write_class_results(predictions(labels, predicted, CIFAR10), tmp_path)
    assert [path.name for path in paths] == ["per_class.csv", "confusion_matrix.png",
                                             "misclassified.png"]
    with paths[0].open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["class"] for row in rows] == CIFAR10
    # Airplanes are images 0, 10, ..., 90: those at a multiple of 4 (0, 20, ..., 80) were
    # taken for automobiles; no truck (odd images) was taken for an airplane.
    assert rows[0] == {"class": "airplane", "precision": "0.5000",
                       "predicted_precision": "1.0000", "images": "10", "correct": "5",
                       "predicted": "5"}
    for path in paths[1:]:
        with Image.open(path) as image:
            image.verify()  # a whole PNG, small enough for the UI's page
            assert image.format == "PNG" and image.width <= 800


def test_a_run_with_no_mistake_and_many_classes_still_gets_its_files(tmp_path):
    classes = [f"class {number}" for number in range(100)]  # CIFAR-100: no counts drawn
    labels = list(range(100))
    paths = write_class_results(predictions(labels, labels, classes), tmp_path)
    assert all(path.stat().st_size > 0 for path in paths)
    assert read_precision(paths[0]) == dict.fromkeys(classes, 1.0)


def test_the_results_are_logged_under_class_results_and_read_back(store, tmp_path):
    client = MlflowClient(store)
    experiment = client.create_experiment("cifar_exp", (tmp_path / "artifacts").as_uri())
    run, older = (client.create_run(experiment).info.run_id for _ in range(2))
    labels = [index % 10 for index in range(40)]
    log_class_results(client, run, predictions(labels, [0] * 40, CIFAR10))
    assert {artifact.path for artifact in client.list_artifacts(run, "class_results")} == {
        "class_results/per_class.csv", "class_results/confusion_matrix.png",
        "class_results/misclassified.png"}
    assert logged_precision(client, run) == {"airplane": 1.0, **dict.fromkeys(CIFAR10[1:],
                                                                              0.0)}
    assert logged_precision(client, older) == {}  # from before class results were logged

