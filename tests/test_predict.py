"""Classifying one's own image files with a trained model."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from cifar_exp.predict import main, predict, read_image
from cifar_exp.serving import trained
from cifar_exp.serving.classifier import Classifier


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
    ranked = predict(image_files, source, top_k=3)
    assert all(len(classes) == 3 for classes in ranked)
    for classes in ranked:
        probabilities = [p for _, p in classes]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1
    # The lossless PNGs get what the classifier gives the test images themselves.
    with torch.no_grad():
        expected = Classifier(source.model, source.augmentation)(
            cifar10.test_images[:3].permute(0, 2, 3, 1))
    for index in range(3):
        name, probability = ranked[2 * index][0]
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
