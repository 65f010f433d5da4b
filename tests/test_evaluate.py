"""Scoring a trained model without training, from its run or its checkpoint."""

from __future__ import annotations

import functools
import shlex
import sys
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from cifar_exp import evaluate as evaluate_module
from cifar_exp.config import compose_config, dotlist_entry
from cifar_exp.errors import UserError
from cifar_exp.evaluate import evaluate, main, parse
from cifar_exp.serving import trained
from cifar_exp.training import scoring


def args(trained_run, data_root, *extra: str, source: str = "run") -> list[str]:
    where = (["--run", trained_run["run_id"]] if source == "run"
             else ["--checkpoint", str(trained_run["checkpoint"])])
    return [*where, "--tracking-uri", trained_run["uri"], f"data.root={data_root}", *extra]


@pytest.mark.parametrize("source", ["run", "checkpoint"])
def test_it_scores_what_the_run_scored(trained_run, data_root, source, capsys):
    # The run's last evaluation, with EMA weights, on its first 500 test images.
    result = evaluate(args(trained_run, data_root, "eval_images=500", "--no-log",
                           source=source))
    assert (result.precision, result.test_loss) == (trained_run["precision"],
                                                    trained_run["test_loss"])
    assert result.images == 500 and result.run_id == ""
    top5 = result.scores["precision_top5"]
    assert result.precision <= top5 <= 1
    out = capsys.readouterr().out
    assert out.startswith(
        f"precision @ 1 = {result.precision:.4f}, precision @ 5 = {top5:.4f}, test loss = ")
    # Then the table per class, printed with --no-log too.
    assert out.splitlines()[1] == ("| class | precision | predicted_precision | images | "
                                   "correct | predicted |")
    assert out.splitlines()[3].startswith("| airplane | ")
    # Last, how to serve the run's model, as the run itself said it.
    serve, ask = out.splitlines()[-2:]
    assert serve.startswith("serve its model: MLFLOW_TRACKING_URI=") and " models:/m-" in serve
    assert ask.startswith("then ask it: ") and "/invocations" in ask


def test_how_it_scores_can_change_and_is_logged_as_a_linked_run(trained_run, data_root,
                                                              monkeypatch):
    typed = args(trained_run, data_root, "eval_images=200", "tta=flip")
    # As `python -m cifar_exp.evaluate ...` starts it: Python puts the module's file first.
    monkeypatch.setattr(sys, "argv", [evaluate_module.__file__, *typed])
    result = evaluate(typed)
    assert result.images == 200 and 0 <= result.precision <= 1
    client = MlflowClient(trained_run["uri"])
    run = client.get_run(result.run_id)
    assert run.info.run_name == f"evaluate {trained_run['name']}"
    assert run.data.tags["evaluation_of"] == trained_run["run_id"]
    assert run.data.params["tta"] == "flip" and run.data.params["eval_images"] == "200"
    assert run.data.metrics["precision"] == result.precision
    assert run.data.metrics == result.scores  # every score, by its name
    assert run.info.experiment_id == client.get_run(trained_run["run_id"]).info.experiment_id
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["cifar10-test"]
    # The trained run's own record is left as training wrote it.
    assert client.get_run(trained_run["run_id"]).data.metrics["precision"] == \
        trained_run["precision"]
    # Its results per class, as training logs a run's.
    assert {artifact.path for artifact in client.list_artifacts(result.run_id,
                                                                "class_results")} == {
        "class_results/per_class.csv", "class_results/confusion_matrix.png",
        "class_results/misclassified.png"}
    # The command that runs it again, as it was typed.
    command = run.data.tags["command"]
    assert command == "python -m cifar_exp.evaluate " + " ".join(typed)
    program, arguments = shlex.split(command)[:3], shlex.split(command)[3:]
    assert program == ["python", "-m", "cifar_exp.evaluate"]
    assert parse(arguments).run == trained_run["run_id"]


def test_it_scores_the_whole_test_set_unless_told(trained_run, data_root, monkeypatch,
                                                  capsys):
    # The run itself evaluated on its first 500 test images; evaluate scores all 10,000.
    scored = []

    def every_answer_right(model, augmentation, images, labels, *args, **options):
        scored.append(labels.numel())
        return scoring.Scored(dict.fromkeys(scoring.METRICS, 1.0), labels)

    monkeypatch.setattr(scoring, "score_with_predictions", every_answer_right)
    result = evaluate(args(trained_run, data_root, "--no-log"))
    assert scored == [10_000] and result.images == 10_000
    assert " on 10000 test images " in capsys.readouterr().out.splitlines()[0]


@pytest.mark.parametrize("given,images", [([], None), (["eval_images=200"], 200)])
def test_eval_images_is_the_whole_test_set_unless_given(tmp_path, given, images):
    run = {**trained_config(), "eval_images": 500}  # a run that evaluated on 500 images
    settings = parse(["--checkpoint", str(tmp_path / "c.pt"), *given]).settings
    assert trained.apply_overrides(run, settings).eval_images == images


KEYS = ("eval_images, eval_batch_size, tta, device, amp, channels_last, data.root, "
        "data.download, data.verify, data.manifest, tracking.uri, tracking.experiment")


@pytest.mark.parametrize("extra,message", [
    (["--run", "0" * 32], "argument --run: not allowed with argument --checkpoint"),
    (["log=maybe"], "log=maybe must be true or false"),
    # Hydra's override grammar, as `run` reads it.
    (["eval_images"], "eval_images: give key=value arguments"),
    (["~eval_images"], "~eval_images: give key=value arguments"),
    (["data.root=a=b"], "data.root=a=b: Hydra's override grammar cannot read this value of "
                        "data.root; quote it: data.root='...' (with \\' for a quote inside)"),
    (["data.root=x'y"], "data.root=x'y: Hydra's override grammar cannot read this value"),
    (["eval_images=[1"], "eval_images=[1: Hydra's override grammar cannot read this value"),
    (["eval_images=1,2"], "eval_images=1,2: eval_images takes one value (this is a sweep)"),
    (["eval_images=range(1,3)"], "eval_images=range(1,3): eval_images takes one value"),
    # Only the keys that do not change the model, set plainly.
    (["steps=5"], f"steps=5: give key=value with one of the keys that do not change the "
                  f"model: {KEYS}"),
    (["model.name=resnet18"], "model.name=resnet18: give key=value with one of the keys"),
    (["data=cifar100"], "data=cifar100: give key=value with one of the keys"),
    (["+eval_images=5"], "+eval_images=5: give key=value with one of the keys"),
    (["++eval_images=5"], "++eval_images=5: give key=value with one of the keys"),
    (["eval_images@x=5"], "eval_images@x=5: give key=value with one of the keys"),
    (["=5"], "=5: give key=value with one of the keys"),
    (["precision=bf16"], "precision=bf16: `precision` was renamed to `amp`; write amp=bf16"),
    # Interpolations would read the trained run's config, not the one `run` composes.
    (["eval_images=${eval_batch_size}"], "eval_images=${eval_batch_size}: evaluate takes "
                                         "values, not interpolations (${...}); write the "
                                         "value itself"),
    (["data.root=${oc.env:HOME}/data"], "data.root=${oc.env:HOME}/data: evaluate takes values"),
    (["data.root='a ${x}'"], "data.root='a ${x}': evaluate takes values"),
    (["data.root=\\${x}"], "data.root=\\${x}: evaluate takes values"),
    (["--tracking-uri", "sqlite:///${x}.db"], "--tracking-uri: evaluate takes values"),
    # The schema's types.
    (["eval_images=abc"], "eval_images=abc: Value 'abc' of type 'str' could not be converted "
                          "to Integer; give eval_images a value of its type"),
    (["eval_images=1e2"], "eval_images=1e2: Value '100.0' of type 'float' could not be "
                          "converted to Integer"),
    (["eval_images=true"], "eval_images=true: Value 'True' of type 'bool' could not be"),
    (["eval_images=nan"], "eval_images=nan: Value 'nan' of type 'float' could not be"),
    (["eval_images="], "eval_images=: Value '' of type 'str' could not be converted"),
    (["eval_batch_size=1.5"], "eval_batch_size=1.5: Value '1.5' of type 'float' could not be"),
    (["eval_batch_size=null"], "eval_batch_size=null: field 'eval_batch_size' is not Optional"),
    (["channels_last=maybe"], "channels_last=maybe: Value 'maybe' is not a valid bool"),
    (["data.verify=maybe"], "data.verify=maybe: Value 'maybe' is not a valid bool"),
    (["data.root=[1,2]"], "data.root=[1,2]: Cannot convert 'list' to string"),
    (["data.root={a:1}"], "data.root={a:1}: Cannot convert 'dict' to string"),
    (["data.manifest=[x]"], "data.manifest=[x]: Cannot convert 'list' to string"),
    # The schema's range checks (config.validate).
    (["eval_images=-5"], "eval_images=-5 must be a positive number of test images"),
    (["eval_images=0"], "eval_images=0 must be a positive number of test images"),
    (["eval_images=7", "eval_images=0"], "eval_images=0 must be a positive number"),
    (["eval_batch_size=0"], "eval_batch_size=0 must be a positive integer"),
    (["tta=maybe"], "tta=maybe is unknown; use one of none, flip, flip_translate"),
    (["device=gpu9"], "device=gpu9 is unknown; use one of auto, cpu, cuda"),
    (["amp=fp64"], "amp=fp64 is unknown; use auto or one of fp32, bf16, fp16"),
    (["tracking.experiment=' '"], "tracking.experiment=' ' must be a name of 1 to 500"),
    ([f"data.root={'c' * 5000}"], "data.root=cccc"),
])
def test_what_it_cannot_do_is_refused_in_one_line_before_anything_loads(
        tmp_path, monkeypatch, capsys, extra, message):
    for load in ("from_run", "from_checkpoint"):
        monkeypatch.setattr(trained, load, lambda *args: pytest.fail("loaded before refusing"))
    assert main(["--checkpoint", str(tmp_path / "c.pt"), *extra]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {message}") and error.count("\n") == 1


@functools.cache
def trained_config() -> dict[str, Any]:
    """A run's resolved config, as its checkpoint or its config.yaml gives it back."""
    return OmegaConf.to_container(compose_config(["steps=20"]), resolve=True)


@pytest.mark.parametrize("override", [
    "tracking.uri='sqlite:///a b.db'", "tracking.uri='postgresql://u@h/db?sslmode=require'",
    "data.root='a=b'", "data.root=a\\,b", "data.root='/tmp/a #b'", "data.root='it\\'s'",
    "data.root='[1,2]'", "data.root=\"null\"", "tracking.experiment='ünï: cödé'",
    "eval_images='100'", "eval_images=null", "channels_last=1", "data.download=yes",
])
def test_what_it_takes_means_what_it_means_to_run(tmp_path, override):
    key = override.partition("=")[0]
    settings = parse(["--checkpoint", str(tmp_path / "c.pt"), override]).settings
    evaluated = OmegaConf.select(trained.apply_overrides(trained_config(), settings), key)
    run = OmegaConf.select(compose_config([override]), key)
    assert (type(evaluated), evaluated) == (type(run), run)


def test_the_tracking_uri_option_is_taken_as_it_is_typed(tmp_path):
    uri = "sqlite:///a b #1 'c'.db"
    args = parse(["--checkpoint", str(tmp_path / "c.pt"), "--tracking-uri", uri])
    assert args.tracking_uri == uri
    assert trained.apply_overrides(trained_config(), args.settings).tracking.uri == uri
    # tracking.uri= wins over --tracking-uri, and is read as `run` reads it.
    args = parse(["--run", "0" * 32, "--tracking-uri", uri, "tracking.uri='sqlite:///b c.db'"])
    assert args.tracking_uri == "sqlite:///b c.db"


@pytest.mark.parametrize("value", [
    "plain", "a #b", "'quoted'", '"double"', "back\\slash", "a: b", "=", "null", "5", "true",
    " spaced ", "line\nbreak", "ünïcödé \U0001f600", "\udc80 undecodable byte", "",
    "- x", "[1]", "{a: 1}", "%tag", "*alias", "\x00\x85\u2028",
    0, 10**20, True, False, None,
])
def test_each_setting_reads_back_as_its_value(value):
    # What serving.trained.apply_overrides does with each setting evaluate passes on.
    read = OmegaConf.from_dotlist([dotlist_entry("data.root", value)]).data.root
    assert (type(read), read) == (type(value), value)


def test_a_run_that_is_not_there_is_named(trained_run, data_root):
    with pytest.raises(UserError, match="no run 0123abcd in sqlite:///"):
        evaluate(["--run", "0123abcd", "--tracking-uri", trained_run["uri"],
                  f"data.root={data_root}"])


def test_the_old_spellings_still_work_with_a_hint(trained_run, data_root, capsys):
    result = evaluate([f"run_id={trained_run['run_id']}", f"tracking.uri={trained_run['uri']}",
                       f"data.root={data_root}", "eval_images=500", "log=false"])
    assert (result.precision, result.run_id) == (trained_run["precision"], "")
    hints = capsys.readouterr().err.splitlines()
    assert hints == ["note: run_id= is now spelled --run <id>; the old spelling works for a "
                     "while", "note: log= is now spelled --no-log (and log=true is the default); "
                     "the old spelling works for a while"]


def test_saying_neither_a_run_nor_a_checkpoint_is_refused_in_one_line(capsys):
    assert main(["eval_images=10"]) == 2
    error = capsys.readouterr().err
    assert error == ("error: one of the arguments --run --checkpoint is required (see "
                     "cifar-exp-evaluate --help)\n")
