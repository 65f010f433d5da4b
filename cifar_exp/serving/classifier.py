"""The logged model as users serve it: raw images in, class names and probabilities out.

`Classifier` wraps a trained network with the evaluation preprocessing and a softmax, so
that it takes what an image file decodes to (uint8, N x 32 x 32 x 3). It is exported with
torch.export and logged as an MLflow pyfunc model (the code in pyfunc_model.py, which
imports nothing of this project), so that `mlflow.pyfunc.load_model` and `mlflow models
serve` answer with the most likely class, its probability and every class's probability,
and refuse what is not a uint8 image batch alike (pyfunc_model.checked_images)."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch
from mlflow.models import ModelSignature, infer_signature
from torch import nn

from cifar_exp.augment import Augmentation

# Kept, not shown: MLflow's advice on type hints for the model's input (the model checks
# its input itself), which it lets through any filter.
with warnings.catch_warnings(record=True):
    from cifar_exp.serving.pyfunc_model import (
        IMAGE_SIDE,  # noqa: F401 (predict's, from here)
        MAX_BATCH,
        CifarClassifier,
    )

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


class Classifier(nn.Module):
    """uint8 images N x 32 x 32 x 3 (rows, columns, RGB) -> class probabilities N x C."""

    def __init__(self, network: nn.Module, augmentation: Augmentation) -> None:
        super().__init__()
        self.network = network
        self.augmentation = augmentation  # plain tensor code, traced into the export

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:  # floats in 0..1 would be taken as near-black images
            raise TypeError(f"images must be uint8 0..255, not {images.dtype}")
        inputs = self.augmentation.eval(images.permute(0, 3, 1, 2))
        return self.network(inputs.contiguous()).float().softmax(-1)


def on_cpu(augmentation: Augmentation) -> Augmentation:
    """A copy of `augmentation` whose tensors live on the CPU, for a model that loads on
    any machine."""
    moved = copy.copy(augmentation)
    for name, value in vars(augmentation).items():
        if isinstance(value, torch.Tensor):
            setattr(moved, name, value.cpu())
    return moved


def write_artifacts(classifier: Classifier, example: torch.Tensor, classes: list[str],
                    folder: Path) -> dict[str, str]:
    """The served model's artifacts in `folder`: `classifier` exported with torch.export
    for any batch size (traced on `example`), and the class names."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = torch.export.export(classifier.eval(), (example,),
                                  dynamic_shapes={"images": {0: batch}})
    torch.export.save(program, folder / "classifier.pt2")
    (folder / "classes.json").write_text(json.dumps(list(classes)))
    return {"program": str(folder / "classifier.pt2"), "classes": str(folder / "classes.json")}


def load_served(artifacts: dict[str, str]) -> CifarClassifier:
    """The served model from its artifacts, as MLflow loads it."""
    model = CifarClassifier()
    model.load_context(SimpleNamespace(artifacts=artifacts))
    return model


def served_signature(predicted: pd.DataFrame) -> ModelSignature:
    """The served model's signature: its output table, and no input schema. With one
    (uint8 N x 32 x 32 x 3), MLflow's scoring server casts a request's numbers to uint8
    before the model sees them: 0.5 becomes 0, and images in 0..1 are answered as black
    ones. Without it the model checks its input itself (pyfunc_model.checked_images), over
    HTTP as in Python."""
    return infer_signature(None, predicted)
