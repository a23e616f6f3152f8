from __future__ import annotations

import json
import logging
import stat

import pytest

from sbssl.io import atomic_path, job_log, write_json_atomic


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
