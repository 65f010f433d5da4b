"""Scoring a trained model without training, from its run or its checkpoint."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from cifar_exp.errors import UserError
from cifar_exp.evaluate import evaluate, main


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
    assert capsys.readouterr().out.startswith(
        f"precision @ 1 = {result.precision:.4f}, precision @ 5 = {top5:.4f}, test loss = ")


def test_how_it_scores_can_change_and_is_logged_as_a_linked_run(trained_run, data_root):
    result = evaluate(args(trained_run, data_root, "eval_images=200", "tta=flip"))
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


@pytest.mark.parametrize("extra,message", [
    ([], None),  # completed below: both sources
    (["model.name=resnet18"], "model.name=resnet18: give key=value with one of the keys that "
                              "do not change the model"),
    (["log=maybe"], "log=maybe must be true or false"),
    (["eval_images"], "eval_images: give key=value arguments"),
    (["eval_images=0"], "eval_images=0 must be a positive number of test images"),
])
def test_what_it_cannot_do_is_refused_in_one_line(trained_run, data_root, capsys, extra,
                                                  message):
    argv = args(trained_run, data_root, *extra)
    if message is None:
        argv, message = [*argv, "--checkpoint", str(trained_run["checkpoint"])], \
            "argument --checkpoint: not allowed with argument --run"
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {message}") and error.count("\n") == 1


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
