"""Two-process DDP (gloo on CPU, launched by torchrun): replicas stay identical, data is sharded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from conftest import make_image_folder

from fatq.checkpoint import model_from_checkpoint
from fatq.train import parameter_digest


def _torchrun(tmp_path, args: list[str]):
    """Two gloo ranks of a W4A4 resnet20 fatq-train run in ``tmp_path``: (completed process, JSON summary)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "fatq.cli_train", "--arch", "resnet20", "--bits", "4", *args]
    command += ["--device", "cpu", "--quiet", "--job-dir", "job", "--json", "out.json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads((tmp_path / "out.json").read_text())


def test_two_gloo_ranks_keep_identical_parameters(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=6)  # 18 train images
    result, summary = _torchrun(tmp_path, ["--data-dir", str(data), "--epochs", "1", "--batch-size", "8"])
    digests = summary["rank_param_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    # what rank 0 saved is what both ranks hold
    saved = model_from_checkpoint(torch.load(tmp_path / "job" / "last.pt", weights_only=True))
    assert parameter_digest(saved) == digests[0]
    assert summary["world_size"] == 2 and summary["steps"] == 3  # 18 images -> 9 per rank, 4 per rank-batch

    record = json.loads((tmp_path / "job" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["train_images"] == 18  # both shards counted once (no padding needed for 18 / 2)
    assert record["images"] == 18  # evaluation shards add up to the whole test split
    assert result.stdout.count("top-1") == 1  # only rank 0 prints


def test_two_gloo_ranks_stream_an_image_folder_through_distributed_sampler(tmp_path):
    """The streaming path under torchrun: DistributedSampler shards, DataLoader workers decode, replicas agree."""
    from test_streaming import make_jpeg_folder

    data = make_jpeg_folder(tmp_path / "data", classes=2, per_class=5)  # 10 train / 10 val JPEGs
    args = ["--dataset", "imagefolder", "--data-dir", str(data), "--loader", "stream", "--image-size", "24"]
    _, summary = _torchrun(tmp_path, [*args, "--workers", "1", "--epochs", "1", "--batch-size", "4"])
    digests = summary["rank_param_digests"]
    assert len(digests) == 2 and digests[0] == digests[1] and summary["steps"] == 3  # 5 per rank, 2 per rank-batch
    last = torch.load(tmp_path / "job" / "last.pt", weights_only=True)
    assert parameter_digest(model_from_checkpoint(last)) == digests[0]
    assert last["input_size"] == [3, 24, 24] and last["train_config"]["loader"] == "stream"
    record = json.loads((tmp_path / "job" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["train_images"] == 10 and record["images"] == 10  # shards add up to the splits exactly
