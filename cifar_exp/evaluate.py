"""Score a trained model without training: the test set's precision (@1, @5) and loss,
and its precision per class.

    cifar-exp-evaluate --run <MLflow run id> [key=value ...]   (or python -m cifar_exp.evaluate)
    cifar-exp-evaluate --checkpoint <file> [key=value ...]

The model is rebuilt from its run's config with the weights the run evaluates (the EMA
copy when it trained with one). Keys that change how it is scored, not what was trained,
may be given as `python -m cifar_exp.run` takes them (Hydra's override grammar, the
schema's types, its range checks; quote a value holding = , or quotes: data.root='a=b'):
eval_images, eval_batch_size, tta, device, amp, channels_last, data.*, tracking.uri,
tracking.experiment; each as a plain value (no sweep, no `${...}`). It scores the whole
test set unless eval_images=N is given (whatever part the run itself evaluated on).
`--no-log` only prints. (The spellings run_id=, checkpoint= and log=false still work,
with a hint.)

The result is logged as a new MLflow run, named `evaluate <run name>` and tagged
`evaluation_of=<run id>`, in the trained run's experiment: the trained run's own record
stays exactly what training wrote, and each evaluation (another test subset, another TTA,
another copy of the data) keeps its settings as its params and can be compared with the
others in the UI. Its results per class are logged with it, under class_results/, as
training logs a run's (cifar_exp.tracking.class_results); the table is printed either
way."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

# Hydra and OmegaConf: imported by cifar_exp.config already, as `run` reads overrides.
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import DictConfig, OmegaConf

from cifar_exp.config import (
    DEFAULT_TRACKING_URI,
    command_overrides,
    compose_config,
    composition_error_line,
    dotlist_entry,
    validate,
)
from cifar_exp.errors import (
    CommandParser,
    ConfigError,
    RecordFailure,
    UserError,
    refused,
)
from cifar_exp.quick_exit import run_and_exit
from cifar_exp.serving.source import add_source_arguments
from cifar_exp.tracking.naming import command_line, git_tags
from cifar_exp.tracking.redact import redact

if TYPE_CHECKING:
    from cifar_exp.serving.trained import Trained
    from cifar_exp.tracking.class_results import Predictions

# The spellings of "which model" before the commands shared one: accepted for a while.
OLD_SPELLINGS = {"run_id": "--run", "checkpoint": "--checkpoint"}


def argument_parser() -> argparse.ArgumentParser:
    """The command line of cifar-exp-evaluate (python -m cifar_exp.evaluate)."""
    parser = CommandParser(prog="cifar-exp-evaluate", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(parser)
    parser.add_argument("--no-log", action="store_true",
                        help="only print: log no MLflow run")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="how to score: eval_images=, tta=, device=, data.root=, ...")
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line: --run or --checkpoint, --tracking-uri, --no-log and the
    evaluation's key=value overrides, checked as `run` checks them before anything is
    loaded. `settings` holds them as serving.trained takes them (a --tracking-uri joins
    them as tracking.uri=, unless tracking.uri= is given); `overrides` as they were typed."""
    args = argument_parser().parse_intermixed_args(_new_spelling(argv))
    settings = scoring_settings(args.overrides, args.tracking_uri)
    args.tracking_uri = settings.get("tracking.uri", args.tracking_uri)
    # The whole test set unless told: the run's own eval_images was a quick check's part.
    settings.setdefault("eval_images", None)
    args.settings = [dotlist_entry(key, value) for key, value in settings.items()]
    return args


def scoring_settings(overrides: list[str], tracking_uri: str) -> dict[str, Any]:
    """Each key the overrides set -> its value as `python -m cifar_exp.run` would read it
    (Hydra's grammar, the schema's type, validate's range checks), the last of a key
    winning; refused in one line otherwise."""
    given = [_evaluation_override(override) for override in command_overrides(overrides)]
    cfg = _composed(given)
    settings = {override.key_or_group: OmegaConf.select(cfg, override.key_or_group)
                for override in given}
    if "tracking.uri" not in settings and tracking_uri != DEFAULT_TRACKING_URI:
        _refuse_interpolation("--tracking-uri", tracking_uri)
        settings["tracking.uri"] = cfg.tracking.uri = tracking_uri
    validate(cfg)
    return settings


def _evaluation_override(text: str) -> Override:
    """`text` as Hydra's override grammar reads it; refused unless it sets one of the keys
    that do not change the model to one plain value."""
    from cifar_exp.serving.trained import EVALUATION_KEYS

    if "=" not in text:
        raise UserError(f"{text}: give key=value arguments, e.g. eval_images=1000")
    key = text.partition("=")[0]
    try:
        [override] = OverridesParser.create().parse_overrides([text])
    except OverrideParseException as error:  # Hydra's own message takes several lines
        raise ConfigError(f"{text}: Hydra's override grammar cannot read this value of {key}; "
                          f"quote it: {key}='...' (with \\' for a quote inside)") from error
    if (override.type is not OverrideType.CHANGE or override.package is not None
            or override.key_or_group not in EVALUATION_KEYS):
        raise ConfigError(f"{text}: give key=value with one of the keys that do not change "
                          f"the model: {', '.join(EVALUATION_KEYS)}")
    if override.is_sweep_override():
        raise ConfigError(f"{text}: {key} takes one value (this is a sweep); quote a value "
                          f"with commas: {key}='...'")
    _refuse_interpolation(text, str(override.value()))
    return override


def _refuse_interpolation(given: str, value: str) -> None:
    """Refuse a `${...}` in `value`: here it would be resolved against the trained run's
    config, not the one `run` composes, so it would not mean what it means there."""
    if "${" in value:
        raise ConfigError(f"{given}: evaluate takes values, not interpolations (${{...}}); "
                          f"write the value itself (the shell expands $VARIABLES)")


def _composed(overrides: list[Override]) -> DictConfig:
    """The default run's config with `overrides`, composed by Hydra as `run` composes it,
    and a value of the wrong type refused in the line `run` says it in."""
    try:
        return compose_config([override.input_line for override in overrides])
    except ConfigCompositionException as error:  # Hydra's message takes several lines
        raise ConfigError(composition_error_line(error)) from error  # as run says it


def _new_spelling(argv: list[str]) -> list[str]:
    """`argv` with run_id=, checkpoint= and log= said the new way, and a hint for each."""
    spelled: list[str] = []
    for argument in argv:
        key, equals, value = argument.partition("=")
        if equals and key in OLD_SPELLINGS:
            spelled += [OLD_SPELLINGS[key], value]
        elif equals and key == "log":
            if value not in ("true", "false"):
                raise UserError(f"log={value} must be true or false")
            spelled += ["--no-log"] if value == "false" else []
        else:
            spelled.append(argument)
            continue
        new = {"run_id": "--run <id>", "checkpoint": "--checkpoint <file>",
               "log": "--no-log (and log=true is the default)"}[key]
        print(f"note: {key}= is now spelled {new}; the old spelling works for a while",
              file=sys.stderr)
    return spelled


@dataclass
class Evaluation:
    scores: dict[str, float]  # by name, as training logs them (training.scoring.METRICS)
    images: int  # how many test images were scored
    source: str  # "run <id>" or a checkpoint's path
    run_id: str  # the MLflow run this evaluation was logged as ("" with --no-log)

    @property
    def precision(self) -> float:
        return self.scores["precision"]

    @property
    def test_loss(self) -> float:
        return self.scores["test_loss"]


def evaluate(argv: list[str]) -> Evaluation:
    """Score what `argv` names; print and (unless --no-log) log the result."""
    # Here, not above: torch and MLflow are not for --help.
    from cifar_exp.data import limit_test_set
    from cifar_exp.serving import trained as trained_models
    from cifar_exp.tracking.class_results import Predictions, class_results, markdown_table
    from cifar_exp.tracking.store import check_tracking_uri
    from cifar_exp.training.scoring import score_with_predictions
    from cifar_exp.training.step import memory_format

    args = parse(argv)
    if args.run:  # from_run checks the store it reads, and logs to, first
        model = trained_models.from_run(args.run, args.tracking_uri, args.settings)
    else:
        model = trained_models.from_checkpoint(args.checkpoint, args.settings)
        if not args.no_log:  # the store it logs to (a store that keeps nothing...), unscored
            check_tracking_uri(model.cfg.tracking.uri)
    cfg, data = model.cfg, model.data
    if cfg.eval_images is not None:
        data = limit_test_set(data, cfg.eval_images)
    scores, predicted = score_with_predictions(
        model.model, model.augmentation, data.test_images, data.test_labels,
        cfg.eval_batch_size, memory_format=memory_format(cfg.channels_last), amp=model.amp,
        tta=cfg.tta)
    predictions = Predictions(data.test_images, data.test_labels, predicted, data.classes)
    count = data.test_labels.numel()
    line = (f"precision @ 1 = {scores['precision']:.4f}, precision @ 5 = "
            f"{scores['precision_top5']:.4f}, test loss = {scores['test_loss']:.4f} on {count} "
            f"test images (tta {cfg.tta}) of {model.source}, step {model.step}")
    print(line)
    print(markdown_table(class_results(predictions)))
    run_id = ""
    if not args.no_log:
        run_id = log_evaluation(model, predictions, scores, args.overrides)
        print(f"logged as MLflow run {run_id} (evaluation_of={model.run_id or '-'}) in "
              f"{redact(cfg.tracking.uri)}")
    for line in how_to_serve_it(model):
        print(line)
    return Evaluation(scores, count, model.source, run_id)


def how_to_serve_it(model: Trained) -> list[str]:
    """How to serve the model the evaluated run logged, as the run itself said; nothing
    where it logged none or its store is not at hand (a checkpoint from elsewhere)."""
    from mlflow.tracking import MlflowClient

    from cifar_exp.tracking.runs import serve_lines, served_model_id
    from cifar_exp.tracking.store import store_opening

    if not model.run_id:
        return []
    try:
        with store_opening(model.cfg.tracking.uri):
            model_id = served_model_id(MlflowClient(model.cfg.tracking.uri), model.run_id)
    except Exception:  # the run is in another store: a checkpoint carried elsewhere
        return []
    return serve_lines(model.cfg.tracking.uri, model_id) if model_id else []


def log_evaluation(model: Trained, predictions: Predictions, scores: dict[str, float],
                   overrides: list[str]) -> str:
    """A new MLflow run holding this evaluation and its results per class, linked to the
    run that trained the model, written as training writes its runs (RunTracker)."""
    from mlflow.tracking import MlflowClient

    from cifar_exp.tracking.runs import RunTracker, data_inputs
    from cifar_exp.tracking.store import store_opening

    cfg = model.cfg
    source_name, experiment = model.source, cfg.tracking.experiment
    if model.run_id:
        try:
            client = MlflowClient(cfg.tracking.uri)
            with store_opening(cfg.tracking.uri):
                source = client.get_run(model.run_id)
                experiment = client.get_experiment(source.info.experiment_id).name
            source_name = source.info.run_name
        except Exception:  # a checkpoint whose run is in another store: name the file
            pass
    tags = {"evaluation_of": model.run_id, "command": command_line("cifar_exp.evaluate"),
            "source": model.source, "data": cfg.data.name, **git_tags()}
    params = {"eval_images": predictions.labels.numel(), "tta": cfg.tta,
              "amp": cfg.amp, "device": cfg.device, "step": model.step,
              "overrides": " ".join(overrides) or "-"}
    with RunTracker(cfg.tracking.uri, experiment, f"evaluate {source_name}", tags=tags,
                    flush_seconds=0) as tracker:
        tracker.log_params(params)
        tracker.log_metrics(scores, model.step)  # each score under the name training uses
        tracker.log_inputs(data_inputs(cfg.data.name, cfg.data.root, splits=("test",)))
        tracker.log_class_results(predictions)
    if tracker.failures:
        raise RecordFailure(f"the MLflow store {redact(cfg.tracking.uri)} failed "
                            f"({tracker.failure_cause or 'see the log'}); not written: "
                            f"{', '.join(tracker.failures)}")
    return tracker.run_id


def main(argv: list[str] | None = None) -> int:
    try:
        evaluate(sys.argv[1:] if argv is None else argv)
    except UserError as error:
        return refused(error)
    except RecordFailure as error:
        print(f"error: {error}", file=sys.stderr)
        return RecordFailure.EXIT_CODE
    return 0


def command() -> NoReturn:
    """`python -m cifar_exp.evaluate` and `cifar-exp-evaluate`: main(), then a quick
    exit (cifar_exp.quick_exit)."""
    run_and_exit(main)


if __name__ == "__main__":
    command()
