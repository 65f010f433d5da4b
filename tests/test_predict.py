"""Classifying one's own image files with a trained model."""

from __future__ import annotations

import importlib.util
import io
import itertools
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_exp.errors import UserError
from cifar_exp.predict import MAX_SIDE, main, predict, ranked, read_image
from cifar_exp.serving import trained
from cifar_exp.serving.classifier import Classifier

PREDICT_MEMORY = Path(__file__).resolve().parents[1] / "experiments" / "predict_memory.py"
TOO_LARGE = f"larger than {MAX_SIDE} x {MAX_SIDE} pixels, the most this reads; shrink it first"


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def image_files(tmp_path_factory, cifar10):
    """Three test images as a lossless 32 x 32 PNG, and the same as a 96 x 96 JPEG."""
    folder = tmp_path_factory.mktemp("images")
    files = []
    for index in range(3):
        image = Image.fromarray(cifar10.test_images[index].permute(1, 2, 0).numpy())
        image.save(folder / f"test{index}.png")
        image.resize((96, 96)).save(folder / f"test{index}.jpg", quality=90)
        files += [folder / f"test{index}.png", folder / f"test{index}.jpg"]
    return files


def test_images_of_any_size_are_read_as_32_by_32_rgb(image_files, cifar10):
    png, jpeg = image_files[0], image_files[1]
    assert torch.equal(torch.as_tensor(read_image(png)), cifar10.test_images[0].permute(1, 2, 0))
    assert read_image(jpeg).shape == (32, 32, 3)


def test_the_top_classes_are_the_served_models(trained_run, data_root, image_files, cifar10):
    source = trained.from_run(trained_run["run_id"], trained_run["uri"],
                              [f"data.root={data_root}"])
    answers = list(predict(image_files, source, top_k=3))
    assert [path for path, _ in answers] == image_files
    top = [classes for _, classes in answers]
    assert all(len(classes) == 3 for classes in top)
    for classes in top:
        probabilities = [p for _, p in classes]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1
    # The lossless PNGs get what the classifier gives the test images themselves.
    with torch.no_grad():
        expected = Classifier(source.model, source.augmentation)(
            cifar10.test_images[:3].permute(0, 2, 3, 1))
    for index in range(3):
        name, probability = top[2 * index][0]
        assert name == cifar10.classes[int(expected[index].argmax())]
        assert probability == pytest.approx(float(expected[index].max()), abs=1e-6)


def test_the_command_prints_a_line_per_image(trained_run, data_root, image_files, capsys,
                                             monkeypatch):
    monkeypatch.setenv("CIFAR_EXP_DATA", str(data_root))
    assert main([str(image_files[0]), str(image_files[1]), "--checkpoint",
                 str(trained_run["checkpoint"]), "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [str(image_files[0]), str(image_files[1])]
    assert all(line.count(", ") == 1 for line in lines)  # two classes each


def test_a_file_that_is_not_an_image_is_one_line(trained_run, tmp_path, capsys):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert main([str(text), "--checkpoint", str(trained_run["checkpoint"])]) == 2
    assert capsys.readouterr().err == f"error: {text}: not an image this reads (PNG or JPEG)\n"


@pytest.fixture(scope="module")
def many_files(tmp_path_factory):
    """300 random 32 x 32 PNG files in a folder of their own, as experiments/predict_memory.py
    writes them: more than a batch."""
    folder = tmp_path_factory.mktemp("many")
    return load_script(PREDICT_MEMORY).write_images(folder, 300)


@pytest.fixture(scope="module")
def checkpoint_model(trained_run, data_root):
    return trained.from_checkpoint(trained_run["checkpoint"], [f"data.root={data_root}"])


def test_streaming_keeps_the_order_and_the_answers_of_one_batch(many_files, checkpoint_model):
    answers = list(predict(many_files, checkpoint_model, top_k=3, batch_files=64))
    assert [path for path, _ in answers] == many_files
    # What one batch of every image gives (as predict did before it streamed).
    images = torch.as_tensor(np.stack([read_image(path) for path in many_files]))
    with torch.no_grad():
        probabilities = Classifier(checkpoint_model.model, checkpoint_model.augmentation)(images)
    expected = ranked(probabilities, checkpoint_model.data.classes, 3)
    for (_, got), want in zip(answers, expected, strict=True):
        assert [name for name, _ in got] == [name for name, _ in want]
        assert [p for _, p in got] == pytest.approx([p for _, p in want], abs=1e-5)


def test_only_one_batch_of_files_is_read_before_its_answers(many_files, checkpoint_model):
    taken = []

    def files():
        for path in many_files:
            taken.append(path)
            yield path

    answers = predict(files(), checkpoint_model, top_k=1, batch_files=64)
    first = next(answers)
    assert first[0] == many_files[0] and len(taken) == 64


def test_a_bad_file_stops_after_the_answers_of_the_batches_before_it(many_files, tmp_path,
                                                                    checkpoint_model):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    answers = predict([*many_files[:100], bad, *many_files[100:]], checkpoint_model, top_k=1,
                      batch_files=64)
    assert [path for path, _ in itertools.islice(answers, 64)] == many_files[:64]
    with pytest.raises(UserError, match="notes.png: not an image this reads"):
        next(answers)


def test_a_folder_is_its_image_files_in_name_order(many_files, trained_run, data_root, capsys,
                                                    monkeypatch):
    monkeypatch.setenv("CIFAR_EXP_DATA", str(data_root))
    folder = many_files[0].parent
    (folder / "notes.txt").write_text("not an image, not taken")
    assert main([str(folder), "--checkpoint", str(trained_run["checkpoint"]),
                 "--top-k", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(path) for path in many_files]


def bomb_png(path: Path, side: int = 50_000) -> Path:
    """A 1 x 1 PNG whose header says `side` x `side` (its checksum fixed): 67 bytes that
    would decode to 2.5 GB."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", side, side)  # IHDR's width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def test_an_image_over_the_size_limit_is_refused_before_it_is_decoded(tmp_path):
    bomb = bomb_png(tmp_path / "bomb.png")  # over Pillow's own limit too: it refuses to open
    with pytest.raises(UserError, match=f"^{bomb}: {TOO_LARGE}$"):
        read_image(bomb)
    # A real image just over the limit, compressed to a few kB; one at the limit reads.
    wide = tmp_path / "wide.png"
    Image.new("1", (MAX_SIDE + 1, 8)).save(wide)
    with pytest.raises(UserError, match=f"^{wide}: {TOO_LARGE}$"):
        read_image(wide)
    Image.new("1", (MAX_SIDE, 8)).save(wide)
    assert read_image(wide).shape == (32, 32, 3)


def test_a_decompression_bomb_is_one_line_and_exit_2(trained_run, data_root, tmp_path, capsys,
                                                     monkeypatch):
    monkeypatch.setenv("CIFAR_EXP_DATA", str(data_root))
    bomb = bomb_png(tmp_path / "bomb.png")
    assert main([str(bomb), "--checkpoint", str(trained_run["checkpoint"])]) == 2
    assert capsys.readouterr().err == f"error: {bomb}: {TOO_LARGE}\n"


def test_a_missing_file_or_an_empty_folder_is_said_before_the_model_loads(tmp_path, capsys):
    missing = tmp_path / "cat.png"
    assert main([str(missing), "--checkpoint", str(tmp_path / "absent.pt")]) == 2
    assert capsys.readouterr().err == f"error: {missing}: no such image file or folder\n"
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--checkpoint", str(tmp_path / "absent.pt")]) == 2
    assert "a folder without PNG or JPEG files" in capsys.readouterr().err


def test_a_checkpoint_that_is_missing_or_not_one_says_what_to_give_instead(tmp_path, capsys):
    image = tmp_path / "cat.png"
    Image.new("RGB", (32, 32)).save(image)
    absent = tmp_path / "absent.pt"
    assert main([str(image), "--checkpoint", str(absent)]) == 2
    assert capsys.readouterr().err == (
        f"error: --checkpoint {absent}: no such file; give a run's checkpoint.pt (in its run "
        f"folder) or --run <MLflow run id>\n")
    not_one = tmp_path / "notes.pt"
    not_one.write_text("not a checkpoint")
    assert main([str(image), "--checkpoint", str(not_one)]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {not_one}: not a readable checkpoint (")
    assert line.endswith("; give another --checkpoint, or --run <run id>")  # not "resume"
