"""Outputs built beside their target and published by one rename (``workspace.staged``)."""

from __future__ import annotations

import pytest

from sqft_service.workspace import staged


def test_a_finished_build_replaces_the_target(tmp_path):
    target = tmp_path / "merged_model"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with staged(target) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".merged_model.")
        staging.mkdir()
        (staging / "new.bin").write_text("new")
        assert (target / "old.bin").is_file()  # readers see the old model until the rename
    assert [p.name for p in target.iterdir()] == ["new.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["merged_model"]  # no staging or old copy left


def test_a_failed_build_leaves_the_target_and_nothing_else(tmp_path):
    target = tmp_path / "merged_model"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with pytest.raises(RuntimeError, match="export failed"), staged(target) as staging:
        staging.mkdir()
        (staging / "half.bin").write_text("half")
        raise RuntimeError("export failed")
    assert [p.name for p in target.iterdir()] == ["old.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["merged_model"]
