"""The MLflow pyfunc model of a cifar_exp run, logged as code beside its artifacts: it
imports only torch, numpy, pandas and MLflow, so it serves wherever those are installed.

Input: a batch of images as integers 0..255 (uint8), N x 32 x 32 x 3 (rows, columns, RGB)
or N x 3 x 32 x 32 (channels first); any N, 0 included (an empty answer). Anything else
(floats, even in 0..1; values outside 0..255; another shape or size) is refused with a
one-line reason, as an MlflowException of INVALID_PARAMETER_VALUE: `mlflow models serve`
answers it with HTTP 400, `predict` in Python raises it.

Output, a row per image: `class` (the most likely class's name), `probability` (its
probability), then one column per class with that class's probability."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NoReturn

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

IMAGE_SIDE = 32
# The most images the exported program takes in one call (its dynamic batch dimension).
MAX_BATCH = 65536
# Images per call of the program: a batch of any size is cut into pieces this large, so that
# memory stays bounded and no batch is over MAX_BATCH.
CHUNK = 1024
ACCEPTED = (f"integers 0..255 (uint8), N x {IMAGE_SIDE} x {IMAGE_SIDE} x 3 (rows, columns, "
            f"RGB) or N x 3 x {IMAGE_SIDE} x {IMAGE_SIDE}")


def refuse(got: str) -> NoReturn:
    """Refuse the request in one line: HTTP 400 from `mlflow models serve`."""
    raise MlflowException.invalid_parameter_value(f"images must be {ACCEPTED}; got {got}")


def checked_images(model_input: Any) -> np.ndarray:
    """`model_input` as a uint8 batch N x 32 x 32 x 3, or a one-line refusal saying why not.
    Floats are refused, not cast: uint8(0.5) is 0, and images in 0..1 would be answered as
    black ones."""
    try:
        array = np.asarray(model_input)
    except (ValueError, TypeError):  # ragged nested lists
        refuse("an array that is not rectangular")
    if array.ndim >= 1 and len(array) == 0:
        return np.zeros((0, IMAGE_SIDE, IMAGE_SIDE, 3), np.uint8)
    if array.dtype.kind not in "ui":
        hint = " (multiply images in 0..1 by 255 and round)" if array.dtype.kind == "f" else ""
        refuse(f"{array.dtype} values{hint}")
    channels_last = array.shape[1:] == (IMAGE_SIDE, IMAGE_SIDE, 3)
    channels_first = array.shape[1:] == (3, IMAGE_SIDE, IMAGE_SIDE)
    if not (channels_last or channels_first):
        hint = " (put a single image in a list)" if array.ndim == 3 else ""
        refuse(f"an array of shape {array.shape}{hint}")
    if array.dtype != np.uint8 and (array.min() < 0 or array.max() > 255):
        refuse(f"values {array.min()}..{array.max()}")
    if channels_first:  # 32 is not 3: the two layouts cannot be mistaken
        array = array.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(array, dtype=np.uint8)


class CifarClassifier(PythonModel):
    def load_context(self, context) -> None:
        self.program = torch.export.load(context.artifacts["program"]).module()
        self.classes = json.loads(Path(context.artifacts["classes"]).read_text())

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        probabilities = self.probabilities(checked_images(model_input))
        best = probabilities.argmax(1)
        frame = pd.DataFrame(probabilities, columns=self.classes)
        frame.insert(0, "probability", probabilities[np.arange(len(best)), best])
        frame.insert(0, "class", [self.classes[index] for index in best])
        return frame

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities N x C of a checked uint8 batch, CHUNK images at a time."""
        pieces = [np.zeros((0, len(self.classes)), np.float32)]
        with torch.no_grad():
            for start in range(0, len(images), CHUNK):
                piece = torch.from_numpy(images[start:start + CHUNK].copy())  # writable
                pieces.append(self.program(piece).numpy())
        return np.concatenate(pieces)


mlflow.models.set_model(CifarClassifier())
