"""The one atomic-folder writer (`mmsoftmoe.atomic.publish_folder`): every file and folder is flushed before the
rename, the parent after it, an existing target is replaced only once the new one is complete; the trainer's
checkpoint save and the export's folder both go through it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import mmsoftmoe.atomic
import mmsoftmoe_training.checkpointing as ckpt
from mmsoftmoe.atomic import publish_folder
from mmsoftmoe.staging import atomic_folder


@pytest.fixture
def flushes(monkeypatch) -> list[tuple[str, Path]]:
    """Every fsync and rename, in order, as ("fsync", path) / ("rename", source)."""
    events = []
    real_fsync, real_rename = os.fsync, Path.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def rename(self: Path, target):
        events.append(("rename", Path(self)))
        return real_rename(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    return events


def fill(folder: Path, text: str) -> set[Path]:
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(text)
    (folder / "sub" / "b.txt").write_text(text * 2)
    return {folder, folder / "sub", folder / "a.txt", folder / "sub" / "b.txt"}


def test_publish_flushes_everything_before_the_rename_and_the_parent_after(tmp_path, flushes):
    tmp, target = tmp_path / ".tmp_x", tmp_path / "x"
    written = fill(tmp, "new")
    publish_folder(tmp, target)
    rename = flushes.index(("rename", tmp))
    assert {path for kind, path in flushes[:rename] if kind == "fsync"} == written
    assert flushes[rename + 1:] == [("fsync", tmp_path)]
    assert (target / "sub" / "b.txt").read_text() == "newnew" and not tmp.exists()


def test_publish_replaces_an_existing_folder_only_when_the_new_one_is_in_place(tmp_path, flushes):
    target, tmp, aside = tmp_path / "x", tmp_path / ".tmp_x", tmp_path / ".old_x"
    fill(target, "old")
    fill(tmp, "new")
    publish_folder(tmp, target, aside=aside)
    renames = [path for kind, path in flushes if kind == "rename"]
    assert renames == [target, tmp]  # the old folder steps aside, then the new one moves in
    assert (target / "a.txt").read_text() == "new" and not aside.exists() and not tmp.exists()
    fill(tmp_path / "y", "other")
    with pytest.raises(FileExistsError, match="no folder to move it aside to"):
        publish_folder(tmp_path / "y", target)


def test_trainer_and_export_publish_through_the_shared_writer(tmp_path, monkeypatch):
    published = []
    real = mmsoftmoe.atomic.publish_folder

    def spy(tmp: Path, target: Path, aside: Path | None = None) -> None:
        published.append(target)
        real(tmp, target, aside)

    monkeypatch.setattr(ckpt, "publish_folder", spy)
    monkeypatch.setattr("mmsoftmoe.staging.publish_folder", spy)
    tmp = tmp_path / f"{ckpt.TMP_PREFIX}final"
    fill(tmp, "model")
    ckpt._publish(tmp, tmp_path / "final")
    with atomic_folder(tmp_path / "export") as folder:
        (folder / "model.onnx").write_text("graph")
    with atomic_folder(tmp_path / "export", overwrite=True) as folder:
        (folder / "model.onnx").write_text("graph 2")
    assert published == [tmp_path / "final", tmp_path / "export", tmp_path / "export"]
    assert (tmp_path / "export" / "model.onnx").read_text() == "graph 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "final"]  # no temporary or old sibling left
