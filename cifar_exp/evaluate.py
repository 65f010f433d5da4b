"""Score a trained model without training: the test set's precision (@1, @5) and loss.

    cifar-exp-evaluate run_id=<MLflow run> [key=value ...]    (or python -m cifar_exp.evaluate)
    cifar-exp-evaluate checkpoint=<file> [key=value ...]

The model is rebuilt from its run's config with the weights the run evaluates (the EMA
copy when it trained with one). Keys that change how it is scored, not what was trained,
may be given like `python -m cifar_exp.run` takes them: eval_images, eval_batch_size,
tta, device, amp, channels_last, data.*, tracking.uri, tracking.experiment. `log=false`
only prints.

The result is logged as a new MLflow run, named `evaluate <run name>` and tagged
`evaluation_of=<run id>`, in the trained run's experiment: the trained run's own record
stays exactly what training wrote, and each evaluation (another test subset, another TTA,
another copy of the data) keeps its settings as its params and can be compared with the
others in the UI."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cifar_exp.errors import UserError
from cifar_exp.tracking.naming import command_line, git_tags
from cifar_exp.tracking.redact import redact

if TYPE_CHECKING:
    from cifar_exp.data import CifarData
    from cifar_exp.serving.trained import Trained

DEFAULT_URI = "sqlite:///mlflow.db"
OWN_KEYS = ("run_id", "checkpoint", "log")


def parse(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """(this command's own keys, the evaluation overrides) from key=value arguments."""
    own, overrides = {}, []
    for argument in argv:
        key, equals, value = argument.partition("=")
        if not equals:
            raise UserError(f"{argument}: give key=value arguments, e.g. run_id=<id> or "
                            f"checkpoint=<file>")
        if key in OWN_KEYS:
            own[key] = value
        else:
            overrides.append(argument)
    if ("run_id" in own) == ("checkpoint" in own):
        raise UserError("say what to score: run_id=<MLflow run> or checkpoint=<file> (one)")
    if own.get("log", "true") not in ("true", "false"):
        raise UserError(f"log={own['log']} must be true or false")
    return own, overrides


@dataclass
class Evaluation:
    scores: dict[str, float]  # by name, as training logs them (training.scoring.METRICS)
    images: int  # how many test images were scored
    source: str  # "run <id>" or a checkpoint's path
    run_id: str  # the MLflow run this evaluation was logged as ("" with log=false)

    @property
    def precision(self) -> float:
        return self.scores["precision"]

    @property
    def test_loss(self) -> float:
        return self.scores["test_loss"]


def evaluate(argv: list[str]) -> Evaluation:
    """Score what `argv` names; print and (unless log=false) log the result."""
    # Here, not above: torch and MLflow are not for --help.
    from cifar_exp.data import limit_test_set
    from cifar_exp.serving import trained as trained_models
    from cifar_exp.training.scoring import score
    from cifar_exp.training.step import memory_format

    own, overrides = parse(argv)
    uri = next((o.partition("=")[2] for o in overrides if o.startswith("tracking.uri=")),
               DEFAULT_URI)
    if "run_id" in own:
        model = trained_models.from_run(own["run_id"], uri, overrides)
    else:
        model = trained_models.from_checkpoint(Path(own["checkpoint"]), overrides)
    cfg, data = model.cfg, model.data
    if cfg.eval_images is not None:
        data = limit_test_set(data, cfg.eval_images)
    scores = score(model.model, model.augmentation, data.test_images, data.test_labels,
                   cfg.eval_batch_size, memory_format=memory_format(cfg.channels_last),
                   amp=model.amp, tta=cfg.tta)
    count = data.test_labels.numel()
    line = (f"precision @ 1 = {scores['precision']:.4f}, precision @ 5 = "
            f"{scores['precision_top5']:.4f}, test loss = {scores['test_loss']:.4f} on {count} "
            f"test images (tta {cfg.tta}) of {model.source}, step {model.step}")
    print(line)
    run_id = ""
    if own.get("log", "true") == "true":
        run_id = log_evaluation(model, data, scores, overrides)
        print(f"logged as MLflow run {run_id} (evaluation_of={model.run_id or '-'}) in "
              f"{redact(cfg.tracking.uri)}")
    return Evaluation(scores, count, model.source, run_id)


def log_evaluation(model: Trained, data: CifarData, scores: dict[str, float],
                   overrides: list[str]) -> str:
    """A new MLflow run holding this evaluation, linked to the run that trained the model."""
    from mlflow.tracking import MlflowClient

    from cifar_exp.tracking.runs import data_inputs
    from cifar_exp.tracking.store import log_data_inputs, open_experiment, store_opening

    cfg = model.cfg
    client = MlflowClient(cfg.tracking.uri)
    source_name = model.source
    experiment_id = None
    if model.run_id:
        try:
            with store_opening(cfg.tracking.uri):
                source = client.get_run(model.run_id)
            source_name, experiment_id = source.info.run_name, source.info.experiment_id
        except Exception:  # a checkpoint whose run is in another store: name the file
            pass
    experiment_id = experiment_id or open_experiment(cfg.tracking.uri, cfg.tracking.experiment)
    tags = {"evaluation_of": model.run_id, "command": redact(command_line("evaluate")),
            "source": model.source, "data": cfg.data.name, **git_tags()}
    run = client.create_run(experiment_id, run_name=f"evaluate {source_name}", tags=tags)
    params = {"eval_images": cfg.eval_images or data.test_labels.numel(), "tta": cfg.tta,
              "amp": cfg.amp, "device": cfg.device, "step": model.step,
              "overrides": redact(" ".join(overrides)) or "-"}
    for key, value in params.items():
        client.log_param(run.info.run_id, key, str(value))
    for name, value in scores.items():  # each score under the name training logs it by
        client.log_metric(run.info.run_id, name, value, step=model.step)
    log_data_inputs(client, run.info.run_id,
                    data_inputs(cfg.data.name, cfg.data.root, splits=("test",)))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    try:
        evaluate(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
