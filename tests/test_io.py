"""Atomic artifact writing: all or nothing, ordinary permissions, one-line error on unwritable dirs."""

import os
import stat

import pytest

from qvggt_export.errors import QVGGTError
from qvggt_export.io import atomic_output, write_json


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "artifact.bin"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_the_previous_artifact(tmp_path):
    target = tmp_path / "plan.json"
    write_json(target, {"version": 1})
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("{broken")
            raise RuntimeError
    assert target.read_text().strip().startswith("{") and '"version": 1' in target.read_text()


def test_artifact_permissions_follow_umask(tmp_path):
    write_json(tmp_path / "a.json", {})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~umask


def test_unwritable_location_is_a_one_line_error(tmp_path):
    # A regular file where a directory should be: fails for root too (CI runs as root).
    (tmp_path / "blocker").write_text("")
    with pytest.raises(QVGGTError, match="cannot write"):
        write_json(tmp_path / "blocker" / "a.json", {})
