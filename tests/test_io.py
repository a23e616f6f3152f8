from __future__ import annotations

import json
import logging
import re
import stat

import pytest

from sbssl.io import atomic_path, job_log, read_yaml, write_json_atomic


def test_atomic_path_renames_on_success_with_normal_permissions(tmp_path):
    target = tmp_path / "sub" / "out.csv"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".csv" and tmp != target
        tmp.write_text("a,b\n")
        assert not target.exists()
    assert target.read_text() == "a,b\n"
    assert stat.S_IMODE(target.stat().st_mode) & 0o044  # group/other may read, unlike mkstemp's 0600
    assert list(target.parent.iterdir()) == [target]


def test_atomic_path_keeps_the_old_file_and_leaves_no_temp_on_failure(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_write_json_atomic_is_byte_stable(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"b": 1, "a": [1.5, None]})
    write_json_atomic(tmp_path / "b.json", {"a": [1.5, None], "b": 1})
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": [1.5, None], "b": 1}


def test_job_log_captures_prints_logging_and_the_traceback(tmp_path):
    log = tmp_path / "logs" / "job.log"
    with pytest.raises(ValueError, match="bad input"):
        with job_log(log):
            print("hello from the job")
            logging.getLogger("sbssl.test").info("a log record")
            raise ValueError("bad input")
    text = log.read_text()
    assert "hello from the job" in text
    assert "a log record" in text
    assert "ValueError: bad input" in text and "Traceback" in text


def test_read_yaml_parses_valid_yaml_safely(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: 1\nb: [x, 2.5, null]\nnested:\n  a: yes\n  list:\n    - {k: v}\n")
    assert read_yaml(path) == {"a": 1, "b": ["x", 2.5, None], "nested": {"a": True, "list": [{"k": "v"}]}}
    path.write_text("!!python/object/apply:os.system [echo]\n")  # arbitrary objects are refused
    with pytest.raises(ValueError, match="not valid YAML"):
        read_yaml(path)


def test_read_yaml_refuses_a_repeated_key_naming_file_and_lines(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("models:\n  a: 1\n  b: 2\n  a: 3\n")
    with pytest.raises(ValueError) as info:
        read_yaml(path, "model zoo")
    message = str(info.value)
    assert message.startswith(f"model zoo {path}: not valid YAML")
    assert re.search(r"found key 'a' a second time \(first at line 2\)", message)
    assert "line 4, column 3" in message  # where the repeat is
    path.write_text("x: 1\nx: 1\n")  # even with the same value, at the top level
    with pytest.raises(ValueError, match=r"(?s)found key 'x' a second time \(first at line 1\).*line 2"):
        read_yaml(path)
    with pytest.raises(FileNotFoundError, match=r"model zoo .*absent\.yaml not found"):
        read_yaml(tmp_path / "absent.yaml", "model zoo")
