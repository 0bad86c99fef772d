"""engine/files.py: a file is replaced whole or not at all, and no temporary file is left behind."""
import json

import pytest

from engine.files import atomic_path, write_json_atomic, write_jsonl_atomic, write_text_atomic


def test_a_finished_write_replaces_the_file_and_keeps_its_suffix(tmp_path):
    target = tmp_path / "out.png"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp != target  # writers that read the suffix
        tmp.write_text("new")
        assert target.read_text() == "old"  # nobody sees the new file before it is whole
    assert target.read_text() == "new" and list(tmp_path.iterdir()) == [target]


def test_a_failed_write_leaves_the_old_file_and_nothing_else(tmp_path):
    target = tmp_path / "report.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"a": 1} and list(tmp_path.iterdir()) == [target]


def test_text_json_and_json_lines(tmp_path):
    write_text_atomic(tmp_path / "a.txt", "x")
    write_json_atomic(tmp_path / "b.json", {"k": [1, 2]}, indent=1)
    write_jsonl_atomic(tmp_path / "c.jsonl", [{"i": 0}, {"i": 1}])
    assert (tmp_path / "a.txt").read_text() == "x"
    assert (tmp_path / "b.json").read_text() == '{\n "k": [\n  1,\n  2\n ]\n}\n'
    assert [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()] == [{"i": 0}, {"i": 1}]
