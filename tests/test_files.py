"""Writing files and folders (train/files.py): a reader never sees a half-written one."""

import pytest

from train import files
from train.errors import HalyardError
from train.files import make_run_dir, partial_of, publish, write_text_atomically


def test_publish_replaces_a_folder_whole(tmp_path):
    final = tmp_path / "FINAL"
    final.mkdir()
    (final / "old.bin").write_text("old")
    partial = partial_of(final)
    assert partial == tmp_path / "FINAL.partial"
    partial.mkdir()
    (partial / "new.bin").write_text("new")
    publish(partial, final)
    assert [p.name for p in final.iterdir()] == ["new.bin"]  # nothing of the older folder is left
    assert not partial.exists()


def test_publish_replaces_a_file(tmp_path):
    final, partial = tmp_path / "state.json", tmp_path / "state.json.partial"
    final.write_text("old")
    partial.write_text("new")
    publish(partial, final)
    assert final.read_text() == "new" and not partial.exists()


def test_write_text_atomically_leaves_no_partial(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    write_text_atomically(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_an_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    path.write_text("old")

    def interrupted(partial, final):
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "publish", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomically(path, "new")
    assert path.read_text() == "old"  # the half-done write is only ever the .partial sibling


def test_a_run_dir_that_cannot_be_made_says_how_to_fix_it(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(HalyardError, match=r"cannot write the run directory '.*a_file/run' .*set cache_dir"):
        make_run_dir(tmp_path / "a_file" / "run")
    make_run_dir(tmp_path / "runs" / "run")
    assert (tmp_path / "runs" / "run").is_dir()
