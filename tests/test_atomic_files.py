"""Atomic writes: a failed write leaves the old file (or folder) as it was and no `.partial` behind."""

import json

import pytest

from fastsae.common.atomic_files import replace_folder_atomically, write_atomically, write_json_atomically, write_text_atomically


def _fail_halfway(partial):
    partial.write_text("half")
    raise RuntimeError("disk full")


def test_writes_text_and_json(tmp_path):
    write_text_atomically(tmp_path / "page.html", "é")
    write_json_atomically(tmp_path / "data.json", {"a": 1})
    assert (tmp_path / "page.html").read_text(encoding="utf-8") == "é"
    assert json.loads((tmp_path / "data.json").read_text()) == {"a": 1}
    assert not list(tmp_path.glob("*.partial"))


def test_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(path, _fail_halfway)
    assert path.read_text() == "old"
    assert not list(tmp_path.glob("*.partial"))


def test_failed_folder_keeps_old_folder(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "cfg.json").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        replace_folder_atomically(folder, lambda partial: _fail_halfway(partial / "cfg.json"))
    assert (folder / "cfg.json").read_text() == "old"
    assert not list(tmp_path.glob("*.partial"))


def test_folder_is_replaced_whole(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "stale.txt").write_text("old")
    replace_folder_atomically(folder, lambda partial: (partial / "cfg.json").write_text("new"))
    assert [path.name for path in folder.iterdir()] == ["cfg.json"]


def test_a_file_in_a_folder_that_does_not_exist_yet_is_written(tmp_path):
    """analyze_texts.py --csv-path new/o.csv read every text, then failed at the write."""
    path = write_text_atomically(tmp_path / "new" / "deeper" / "page.md", "# done")
    assert path.read_text() == "# done" and not list(path.parent.glob("*.partial"))
