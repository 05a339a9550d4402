"""Atomic writes: a failed write leaves the old file (or folder) as it was and no `.partial` behind."""

import json
import threading
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from fastsae.common.atomic_files import replace_folder_atomically, write_atomically, write_json_atomically, write_text_atomically
from fastsae.evaluate.evaluate_sae import plot_feature_density
from fastsae.evaluate.sparse_probing import plot_sparse_probing
from fastsae.train.training_report import plot_training_curves


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


ROW = {"tokens": 256, "loss": 0.5, "fvu": 0.5, "l0": 4.0, "dead_fraction": 0.0}
TASK = {"sae_top_1_test_accuracy": 0.6, "ceiling_test_accuracy": 0.9}
FIGURES = {
    "feature_density.png": lambda path: plot_feature_density(path, [0.1, 0.0, 0.01], "SAE"),
    "training_curves.png": lambda path: plot_training_curves(path, "SAE", [ROW, {**ROW, "tokens": 512}], [ROW]),
    "sparse_probing.png": lambda path: plot_sparse_probing(path, {"k_values": [1], "tasks": {"planning": TASK}}, "SAE"),
}


@pytest.mark.parametrize("name", FIGURES)
def test_a_figure_interrupted_mid_write_leaves_the_old_one(tmp_path, monkeypatch, name):
    """Ctrl-C while matplotlib writes: these figures were saved in place, so half a PNG took the old one's name (and
    export_sae.py copies feature_density.png and training_curves.png)."""

    def interrupted_savefig(figure, path, **settings):
        Path(path).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    path = tmp_path / name
    path.write_bytes(b"old")
    monkeypatch.setattr(Figure, "savefig", interrupted_savefig)
    with pytest.raises(KeyboardInterrupt):
        FIGURES[name](path)
    assert path.read_bytes() == b"old" and [file.name for file in tmp_path.iterdir()] == [name]


def test_two_writers_of_one_file_never_write_into_each_other(tmp_path):
    """Two runs sharing an LLM answer cache, writing one file at once: each write lands whole."""
    path = tmp_path / "answer.json"
    both_writing, errors = threading.Barrier(2), []

    def write(text: str) -> None:
        def fill(partial: Path) -> None:
            partial.write_text(text[:2])
            both_writing.wait(timeout=10)  # both writers are inside their write now
            with partial.open("a") as file:
                file.write(text[2:])

        try:
            write_atomically(path, fill, private_partial=True)
        except Exception as error:  # a shared .partial: the second rename found it gone
            errors.append(error)

    writers = [threading.Thread(target=write, args=(text,)) for text in ("aaaa", "bbbb")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert errors == [] and path.read_text() in ("aaaa", "bbbb") and not list(tmp_path.glob("*.partial"))


def test_a_partial_file_a_kill_left_is_replaced_by_the_next_write(tmp_path):
    """The fixed name: a checkpoint's half-written .partial (gigabytes at M=131,072) never stays beside the file."""
    path = tmp_path / "SAE.pt"
    (tmp_path / "SAE.pt.partial").write_bytes(b"half of a killed save")
    write_atomically(path, lambda partial: partial.write_bytes(b"whole"))
    assert path.read_bytes() == b"whole" and [file.name for file in tmp_path.iterdir()] == ["SAE.pt"]
