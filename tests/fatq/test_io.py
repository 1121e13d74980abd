"""fatq.io.staged_files: several files written as one, also when the writing process is killed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fatq.io import STAGING_MARK, remove_stale_temp_files, staged_files


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if STAGING_MARK in p.name or ".tmp" in p.name)


def test_all_files_arrive_together(tmp_path):
    targets = [tmp_path / "m.deploy.npz", tmp_path / "m.onnx"]
    with staged_files(targets) as staged:
        for target in targets:
            assert not target.exists()  # nothing visible before the set is complete
            staged[target].write_text(target.name)
    assert [t.read_text() for t in targets] == ["m.deploy.npz", "m.onnx"]
    assert _leftovers(tmp_path) == []


def test_an_error_leaves_nothing_new_and_keeps_the_old_files(tmp_path):
    old, new = tmp_path / "old.onnx", tmp_path / "m.onnx"
    old.write_text("kept")
    with pytest.raises(RuntimeError), staged_files([tmp_path / "m.deploy.npz", new]) as staged:
        staged[tmp_path / "m.deploy.npz"].write_text("half")
        raise RuntimeError("writer failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.onnx"]


# a process killed (os._exit skips every cleanup, as SIGKILL does) after writing one file of the set
_KILLED_WRITER = """
import os, sys
from pathlib import Path
from fatq.io import staged_files
out = Path(sys.argv[1])
with staged_files([out.with_suffix(".deploy.npz"), out]) as staged:
    staged[out.with_suffix(".deploy.npz")].write_text("written before the kill")
    os._exit(9)
"""


def test_a_killed_writer_leaves_only_its_staging_which_the_next_write_removes(tmp_path):
    out = tmp_path / "m.onnx"
    result = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(out)], capture_output=True, text=True)
    assert result.returncode == 9, result.stderr
    assert not out.exists() and not out.with_suffix(".deploy.npz").exists()  # no orphan companion
    assert len(_leftovers(tmp_path)) == 1  # the hidden staging directory of the dead process
    with staged_files([out]) as staged:
        staged[out].write_text("complete")
    assert out.read_text() == "complete" and _leftovers(tmp_path) == []


def test_missing_directory_is_one_sentence(tmp_path):
    with pytest.raises(Exception, match="does not exist"), staged_files([tmp_path / "no" / "m.onnx"]):
        pass


# a checkpoint save killed mid-write: os._exit inside atomic_path's block leaves its temp file behind
_KILLED_SAVE = """
import os, sys
from fatq.io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half a checkpoint")
    os._exit(9)
"""


def test_temp_files_of_a_killed_save_are_removed_and_live_ones_kept(tmp_path):
    last = tmp_path / "last.pt"
    subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(last)], check=False)
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".last.pt.")]
    assert len(stale) == 1 and not last.exists()
    live = tmp_path / f".best.pt.{os.getpid()}.abcd1234.tmp.pt"  # this process is alive: not stale
    live.write_bytes(b"being written")
    assert remove_stale_temp_files(tmp_path) == stale
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]
