"""Placing outputs: atomic moves that never clobber what appeared meanwhile, all or nothing, and removal."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from ffworker import outputs
from ffworker.kinds.base import Output


def temp_file(directory: Path, name: str, content: bytes = b"new") -> Path:
    path = directory / f".ffwtmp.job.1.{name}"
    path.write_bytes(content)
    return path


def test_a_file_is_placed_and_its_temp_name_is_gone(tmp_path):
    temp = temp_file(tmp_path, "out.mp4")
    outputs.publish_file(temp, tmp_path / "out.mp4", overwrite=False, user_path="out.mp4")
    assert (tmp_path / "out.mp4").read_bytes() == b"new" and not temp.exists()


def test_a_file_that_appeared_meanwhile_is_kept_unless_overwrite(tmp_path):
    (tmp_path / "out.mp4").write_bytes(b"theirs")
    temp = temp_file(tmp_path, "out.mp4")
    with pytest.raises(outputs.OutputExists, match="'out.mp4' appeared while the job ran"):
        outputs.publish_file(temp, tmp_path / "out.mp4", overwrite=False, user_path="out.mp4")
    assert (tmp_path / "out.mp4").read_bytes() == b"theirs"
    outputs.publish_file(temp, tmp_path / "out.mp4", overwrite=True, user_path="out.mp4")
    assert (tmp_path / "out.mp4").read_bytes() == b"new"


def test_a_directory_replaces_a_previous_one_as_a_whole(tmp_path):
    final = tmp_path / "ladder"
    final.mkdir()
    (final / "old.ts").write_bytes(b"old")
    temp = tmp_path / ".ffwtmp.job.1.ladder"
    temp.mkdir()
    (temp / "master.m3u8").write_text("#EXTM3U\n")
    with pytest.raises(outputs.OutputExists):
        outputs.publish_dir(temp, final, overwrite=False, user_path="ladder")
    outputs.publish_dir(temp, final, overwrite=True, user_path="ladder")
    assert sorted(p.name for p in final.iterdir()) == ["master.m3u8"]
    assert not temp.exists()


def test_a_directory_does_not_replace_a_file(tmp_path):
    (tmp_path / "ladder").write_bytes(b"file")
    temp = tmp_path / ".ffwtmp.job.1.ladder"
    temp.mkdir()
    with pytest.raises(outputs.OutputExists, match="not a directory"):
        outputs.publish_dir(temp, tmp_path / "ladder", overwrite=True, user_path="ladder")


def test_publish_takes_back_what_it_placed_when_a_later_output_cannot_be(tmp_path):
    first = Output("a.mp4", tmp_path / "a.mp4", temp_file(tmp_path, "a.mp4"))
    second = Output("b.mp4", tmp_path / "b.mp4", temp_file(tmp_path, "b.mp4"))
    (tmp_path / "b.mp4").write_bytes(b"theirs")
    with pytest.raises(outputs.OutputExists):
        outputs.publish([first, second], overwrite=False)
    assert not (tmp_path / "a.mp4").exists()
    assert (tmp_path / "b.mp4").read_bytes() == b"theirs"


def test_remove_takes_files_trees_and_links_but_never_follows_a_link(tmp_path):
    (tmp_path / "tree/sub").mkdir(parents=True)
    (tmp_path / "tree/sub/f").write_bytes(b"x")
    (tmp_path / "kept").mkdir()
    os.symlink(tmp_path / "kept", tmp_path / "link")
    for name in ("tree", "link", "missing"):
        outputs.remove(tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


def test_size_counts_a_file_or_the_files_of_a_tree(tmp_path):
    (tmp_path / "d/e").mkdir(parents=True)
    (tmp_path / "d/a").write_bytes(b"12")
    (tmp_path / "d/e/b").write_bytes(b"345")
    assert outputs.size_bytes(tmp_path / "d") == 5 and outputs.size_bytes(tmp_path / "d/a") == 2
