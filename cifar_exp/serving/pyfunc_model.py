"""The MLflow pyfunc model of a cifar_exp run, logged as code beside its artifacts: it
imports only torch, numpy, pandas and MLflow, so it serves wherever those are installed.

Input: uint8 images N x 32 x 32 x 3 (rows, columns, RGB). Output, a row per image: `class`
(the most likely class's name), `probability` (its probability), then one column per class
with that class's probability."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel


class CifarClassifier(PythonModel):
    def load_context(self, context) -> None:
        self.program = torch.export.load(context.artifacts["program"]).module()
        self.classes = json.loads(Path(context.artifacts["classes"]).read_text())

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        images = torch.as_tensor(np.ascontiguousarray(model_input, dtype=np.uint8))
        with torch.no_grad():
            probabilities = self.program(images).numpy()
        best = probabilities.argmax(1)
        frame = pd.DataFrame(probabilities, columns=self.classes)
        frame.insert(0, "probability", probabilities[np.arange(len(best)), best])
        frame.insert(0, "class", [self.classes[index] for index in best])
        return frame


mlflow.models.set_model(CifarClassifier())
