"""--download: CIFAR-10 through torchvision, from a small archive served on 127.0.0.1 (no test touches the internet)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import pickle
import tarfile
import threading

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10

from fatq.cli_train import main

LABELS = [f"label{i}" for i in range(10)]


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _cifar_archive(per_batch: int = 2) -> tuple[bytes, dict]:
    """A CIFAR-10 archive in torchvision's layout with ``per_batch`` images per batch file; and its md5s."""
    rng = np.random.default_rng(0)
    members, md5s = {}, {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for index, name in enumerate(names):
        entry = {
            "data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
            "labels": [(index + i) % 10 for i in range(per_batch)],
        }
        members[name] = pickle.dumps(entry)
    members["batches.meta"] = pickle.dumps({"label_names": LABELS})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            md5s[name] = _md5(data)
    return buffer.getvalue(), md5s


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www; yields its base URL."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _point_torchvision_at(monkeypatch, url: str, archive: bytes, md5s: dict) -> None:
    """CIFAR10's class attributes describe the small archive instead of the real one (url and md5s only)."""
    monkeypatch.setattr(CIFAR10, "url", url)
    monkeypatch.setattr(CIFAR10, "tgz_md5", _md5(archive))
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5s[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5s["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5s["batches.meta"]})


TRAIN = ["--arch", "resnet20", "--bits", "4", "--batch-size", "4", "--max-steps", "1", "--quiet", "--device", "cpu"]


def test_download_fetches_checks_and_trains_on_cifar10(server, tmp_path, monkeypatch):
    root, base = server
    archive, md5s = _cifar_archive()
    (root / "cifar-10-python.tar.gz").write_bytes(archive)
    _point_torchvision_at(monkeypatch, f"{base}/cifar-10-python.tar.gz", archive, md5s)
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "new" / "cifar"  # does not exist yet
    argv = [*TRAIN, "--dataset", "cifar10", "--data-dir", str(data), "--download", "--job-dir", "job"]
    assert main([*argv, "--json", "out.json"]) == 0
    assert (data / "cifar-10-batches-py" / "test_batch").is_file()
    last = torch.load(tmp_path / "job" / "last.pt", weights_only=True)
    assert last["class_names"] == LABELS and last["input_size"] == [3, 32, 32]
    assert json.loads((tmp_path / "out.json").read_text())["test_images"] == 2
    # a second --download finds the files intact and fetches nothing (the server is gone from the URL)
    monkeypatch.setattr(CIFAR10, "url", f"{base}/moved-away.tar.gz")
    assert main([*TRAIN, "--dataset", "cifar10", "--data-dir", str(data), "--download", "--job-dir", "job2"]) == 0


def test_download_with_a_wrong_md5_is_one_sentence_and_leaves_no_archive(server, tmp_path, monkeypatch, capsys):
    root, base = server
    archive, md5s = _cifar_archive()
    (root / "cifar-10-python.tar.gz").write_bytes(archive[:-10] + b"0123456789")  # corrupted in transit
    _point_torchvision_at(monkeypatch, f"{base}/cifar-10-python.tar.gz", archive, md5s)
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "cifar"
    assert main([*TRAIN, "--dataset", "cifar10", "--data-dir", str(data), "--download", "--job-dir", "job"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "failed its md5 check" in err[0], err
    assert not (data / "cifar-10-python.tar.gz").exists() and not (tmp_path / "job").exists()


def test_download_from_an_unreachable_server_is_one_sentence(server, tmp_path, monkeypatch, capsys):
    _, base = server
    archive, md5s = _cifar_archive()
    _point_torchvision_at(monkeypatch, f"{base}/missing.tar.gz", archive, md5s)  # 404
    monkeypatch.chdir(tmp_path)
    assert main([*TRAIN, "--dataset", "cifar10", "--data-dir", "cifar", "--download", "--job-dir", "job"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot download CIFAR-10" in err[0], err


def test_download_is_for_cifar10_only(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*TRAIN, "--dataset", "imagefolder", "--data-dir", "x", "--download"]) == 2
    assert "needs --dataset cifar10" in capsys.readouterr().err
