"""Reading CIFAR-10/100 in both official layouts, and the errors for broken data."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets

from cifar_exp import checksums
from cifar_exp.data import data_files, load_cifar, main
from cifar_exp.errors import DataError
from tests.conftest import MkdirPayload, synthetic_images, write_binary_batch, write_pickle


def test_real_cifar10_loads_whole(cifar10):
    assert cifar10.train_images.shape == (50_000, 3, 32, 32)
    assert cifar10.test_images.shape == (10_000, 3, 32, 32)
    assert cifar10.train_images.dtype == torch.uint8
    assert cifar10.train_labels.dtype == torch.int64
    assert cifar10.classes[:3] == ["airplane", "automobile", "bird"]
    assert cifar10.num_classes == 10
    assert torch.bincount(cifar10.train_labels).tolist() == [5000] * 10
    assert torch.bincount(cifar10.test_labels).tolist() == [1000] * 10
    # The documented per-channel mean of this copy's training set.
    mean = cifar10.train_images.float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor([0.4913, 0.4821, 0.4465]), atol=2e-4)


def test_binary_layout_matches_the_record_format(tiny_cifar10_binary):
    data = load_cifar("cifar10", tiny_cifar10_binary)
    assert data.train_images.shape == (20, 3, 32, 32)
    assert data.train_labels.tolist() == [i + j for i in range(1, 6) for j in range(4)]
    assert torch.equal(data.train_images[:4], torch.from_numpy(synthetic_images(4, 1)))
    assert torch.equal(data.test_images, torch.from_numpy(synthetic_images(3, 0)))
    assert data.test_labels.tolist() == [0, 9, 5]
    assert data.classes == [f"class{i}" for i in range(10)]


def test_python_layout_reads_the_same_content(tiny_cifar10_binary, tiny_cifar10_python):
    binary = load_cifar("cifar10", tiny_cifar10_binary)
    python = load_cifar("cifar10", tiny_cifar10_python)
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(binary, name), getattr(python, name)), name
    assert python.classes == binary.classes


def test_cifar100_binary_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    write_binary_batch(folder / "train.bin", synthetic_images(5, 1), np.array([0, 50, 99, 7, 3]),
                       coarse=np.array([19, 1, 2, 3, 4]))
    write_binary_batch(folder / "test.bin", synthetic_images(2, 2), np.array([98, 1]),
                       coarse=np.array([0, 0]))
    (folder / "fine_label_names.txt").write_text("\n".join(f"f{i}" for i in range(100)))
    data = load_cifar("cifar100", tmp_path)
    assert data.train_labels.tolist() == [0, 50, 99, 7, 3]
    assert data.test_labels.tolist() == [98, 1]
    assert torch.equal(data.train_images, torch.from_numpy(synthetic_images(5, 1)))
    assert data.num_classes == 100


def test_cifar100_python_layout(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    write_pickle(folder / "train", {"data": synthetic_images(5, 1).reshape(5, -1),
                                    "fine_labels": [0, 50, 99, 7, 3], "coarse_labels": [0] * 5})
    write_pickle(folder / "test", {"data": synthetic_images(2, 2).reshape(2, -1),
                                   "fine_labels": [98, 1], "coarse_labels": [0, 0]})
    write_pickle(folder / "meta", {"fine_label_names": [f"f{i}".encode() for i in range(100)]})
    data = load_cifar("cifar100", tmp_path)
    assert data.train_labels.tolist() == [0, 50, 99, 7, 3]
    assert data.classes[99] == "f99"


def test_missing_data_set_names_the_folder_and_the_fix(tmp_path):
    with pytest.raises(DataError) as error:
        load_cifar("cifar10", tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and "cifar-10-batches-bin" in message
    assert "data.root" in message and "data.download=true" in message
    assert "\n" not in message


def test_missing_batch_file_is_named(tiny_cifar10_binary):
    missing = tiny_cifar10_binary / "cifar-10-batches-bin" / "test_batch.bin"
    missing.unlink()
    with pytest.raises(DataError, match=f"{missing}: missing"):
        load_cifar("cifar10", tiny_cifar10_binary)


def test_truncated_binary_file_is_named(tiny_cifar10_binary):
    broken = tiny_cifar10_binary / "cifar-10-batches-bin" / "data_batch_3.bin"
    broken.write_bytes(broken.read_bytes()[:-100])
    with pytest.raises(DataError, match=f"{broken}: .* not a whole number of 3073-byte records"):
        load_cifar("cifar10", tiny_cifar10_binary)


def test_label_out_of_range_is_named(tiny_cifar10_binary):
    broken = tiny_cifar10_binary / "cifar-10-batches-bin" / "data_batch_2.bin"
    write_binary_batch(broken, synthetic_images(2, 0), np.array([3, 200]))
    with pytest.raises(DataError, match=f"{broken}: label 200 is out of range 0..9"):
        load_cifar("cifar10", tiny_cifar10_binary)


@pytest.mark.parametrize("labels,message", [
    ([0, -1, 2, 3], "label -1 is out of range 0..9"),
    ([0, 1, 2, 10], "label 10 is out of range 0..9"),
    (["cat", 1, 2, 3], "its labels are not whole numbers"),
    ([0, 1, 2, 2**70], "its labels are not whole numbers"),
])
def test_a_python_file_with_bad_labels_is_named(tiny_cifar10_python, labels, message):
    broken = tiny_cifar10_python / "cifar-10-batches-py" / "data_batch_2"
    write_pickle(broken, {"data": synthetic_images(4, 2).reshape(4, -1), "labels": labels})
    with pytest.raises(DataError, match=f"{broken}: {message}"):
        load_cifar("cifar10", tiny_cifar10_python)


def test_python_file_that_is_not_cifar_is_named(tiny_cifar10_python):
    broken = tiny_cifar10_python / "cifar-10-batches-py" / "data_batch_1"
    broken.write_bytes(b"this is not a pickle")
    with pytest.raises(DataError, match=f"{broken}: not a CIFAR-10 python-layout file"):
        load_cifar("cifar10", tiny_cifar10_python)


def test_malicious_pickle_is_refused_and_never_runs(tiny_cifar10_python, tmp_path):
    marker = tmp_path / "payload-ran"
    broken = tiny_cifar10_python / "cifar-10-batches-py" / "data_batch_1"
    broken.write_bytes(pickle.dumps({b"data": MkdirPayload(marker), b"labels": [0]}))
    with pytest.raises(DataError, match="refused to load posix.mkdir"):
        load_cifar("cifar10", tiny_cifar10_python)
    assert not marker.exists()


def test_unknown_data_set_lists_the_choices(tmp_path):
    with pytest.raises(DataError, match=r"unknown data set 'mnist'; choose one of \['cifar10'"):
        load_cifar("mnist", tmp_path)


def test_root_defaults_to_the_environment(monkeypatch, tiny_cifar10_binary):
    monkeypatch.setenv("CIFAR_EXP_DATA", str(tiny_cifar10_binary))
    assert load_cifar("cifar10").train_images.shape[0] == 20


def test_download_fetches_through_torchvision_when_absent(monkeypatch, tmp_path,
                                                          tiny_cifar10_python):
    calls = []

    def fake_cifar10(root: str, train: bool, download: bool) -> None:
        # Stands in for the network: lays out the archive's content as torchvision would.
        calls.append((root, train, download))
        target = Path(root) / "cifar-10-batches-py"
        if not target.exists():
            (tiny_cifar10_python / "cifar-10-batches-py").rename(target)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    root = tmp_path / "fresh"
    root.mkdir()
    data = load_cifar("cifar10", root, download=True)
    assert calls == [(str(root), True, True), (str(root), False, True)]
    assert data.train_images.shape[0] == 20


def test_failed_download_is_one_clear_line(monkeypatch, tmp_path):
    def offline(root: str, train: bool, download: bool) -> None:
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match="could not download CIFAR-10 .* network unreachable"):
        load_cifar("cifar10", tmp_path, download=True)


def test_to_moves_every_tensor(tiny_cifar10_binary):
    data = load_cifar("cifar10", tiny_cifar10_binary).to("cpu")
    assert data.train_images.device.type == "cpu" and data.classes[0] == "class0"


def test_first_test_images_cuts_the_test_set_only(tiny_cifar10_binary):
    data = load_cifar("cifar10", tiny_cifar10_binary)
    cut = data.first_test_images(3)
    assert torch.equal(cut.test_images, data.test_images[:3])
    assert torch.equal(cut.test_labels, data.test_labels[:3])
    assert cut.train_images is data.train_images and cut.classes == data.classes


def test_data_command_reports_the_set(data_root, capsys):
    main(["--root", str(data_root)])
    printed = capsys.readouterr().out
    assert "CIFAR-10 in" in printed and "50,000 training and 10,000 test images" in printed


def test_data_command_fails_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--root", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: CIFAR-10 not found")


def test_manifest_written_for_a_copy_verifies_it(tiny_cifar10_binary, tmp_path, capsys):
    manifest = tmp_path / "manifest.md5"
    main(["--root", str(tiny_cifar10_binary), "--write-manifest", str(manifest)])
    assert "wrote the MD5s of 7 files" in capsys.readouterr().out
    lines = manifest.read_text().splitlines()
    assert len(lines) == 7 and lines[0].endswith("  cifar-10-batches-bin/data_batch_1.bin")
    data = load_cifar("cifar10", tiny_cifar10_binary, manifest=manifest)
    assert data.train_images.shape[0] == 20


def test_manifest_mismatch_names_the_file(tiny_cifar10_binary, tmp_path):
    manifest = tmp_path / "manifest.md5"
    main(["--root", str(tiny_cifar10_binary), "--write-manifest", str(manifest)])
    changed = tiny_cifar10_binary / "cifar-10-batches-bin" / "data_batch_4.bin"
    content = bytearray(changed.read_bytes())
    content[100] ^= 1  # one bit: the size and the labels stay valid
    changed.write_bytes(bytes(content))
    load_cifar("cifar10", tiny_cifar10_binary)  # unchecked, it still loads
    with pytest.raises(DataError) as error:
        load_cifar("cifar10", tiny_cifar10_binary, verify=True, manifest=manifest)
    message = str(error.value)
    assert message.startswith(f"{changed}: MD5 {checksums.md5(changed)} differs from ")
    assert f"in {manifest}; the file is corrupt or another copy" in message


def test_manifest_without_the_file_or_malformed_is_refused(tiny_cifar10_binary, tmp_path):
    manifest = tmp_path / "manifest.md5"
    manifest.write_text("# only one file\n" + "0" * 32 + "  cifar-10-batches-bin/other.bin\n")
    missing = tiny_cifar10_binary / "cifar-10-batches-bin" / "data_batch_1.bin"
    with pytest.raises(DataError, match=f"{missing}: not listed in {manifest}"):
        load_cifar("cifar10", tiny_cifar10_binary, manifest=manifest)
    manifest.write_text("abc data_batch_1.bin\n")
    with pytest.raises(DataError, match=r"manifest.md5:1: not an 'md5  path' line"):
        load_cifar("cifar10", tiny_cifar10_binary, manifest=manifest)
    with pytest.raises(DataError, match="data.manifest=/nowhere.md5: no such file"):
        load_cifar("cifar10", tiny_cifar10_binary, manifest="/nowhere.md5")


def test_python_layout_verifies_against_the_official_md5s(tiny_cifar10_python, monkeypatch):
    folder = tiny_cifar10_python / "cifar-10-batches-py"
    # The synthetic files are not the official ones: refused, naming the first file.
    with pytest.raises(DataError, match=f"{folder / 'data_batch_1'}: MD5 .* differs from "
                                        f"c99cafc152244af753f735de768cd75f in the official"):
        load_cifar("cifar10", tiny_cifar10_python, verify=True)
    official = {f"cifar-10-batches-py/{path.name}": checksums.md5(path)
                for path in folder.iterdir()}
    monkeypatch.setattr(checksums, "KNOWN_MD5", official)  # as if they were the official
    assert load_cifar("cifar10", tiny_cifar10_python, verify=True).train_images.shape[0] == 20


def test_binary_layout_needs_a_manifest_to_verify(tiny_cifar10_binary):
    with pytest.raises(DataError, match="no official MD5 is known for cifar-10-batches-bin/ .* "
                                        "give data.manifest=<file>"):
        load_cifar("cifar10", tiny_cifar10_binary, verify=True)


def test_real_data_verifies_against_its_own_manifest(data_root, tmp_path, capsys):
    manifest = tmp_path / "manifest.md5"
    main(["--root", str(data_root), "--write-manifest", str(manifest)])
    names = [path.relative_to(data_root).as_posix() for path in data_files("cifar10", data_root)]
    assert [line.split("  ")[1] for line in manifest.read_text().splitlines()] == names
    main(["--root", str(data_root), "--manifest", str(manifest)])
    printed = capsys.readouterr().out
    assert "50,000 training and 10,000 test images" in printed and "files verified" in printed


def test_a_download_that_fails_leaves_no_data_folder(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match="could not download CIFAR-10 into .*Network is "
                                        "unreachable"):
        load_cifar("cifar10", tmp_path / "data", download=True)
    assert list(tmp_path.iterdir()) == []


def test_a_binary_manifest_is_refused_in_one_line(tiny_cifar10_binary, tmp_path):
    manifest = tmp_path / "manifest.bin"
    manifest.write_bytes(bytes(range(256)))
    with pytest.raises(DataError, match="not a text file of 'md5  path' lines"):
        load_cifar("cifar10", tiny_cifar10_binary, manifest=manifest)
