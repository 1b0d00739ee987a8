"""Resumable storage: part files, stale and broken parts, merge and atomic finalize."""

from __future__ import annotations

import pandas as pd
import pytest

from mrplip_core.captions.parts import PartWriter, finalize, merge_rows, parts_dir, read_parts, settled_patch_ids


def row(pid, caption="c", error=None):
    return {"patch_id": pid, "prompt": "p", "caption": caption, "model": "m", "backend": "b", "params": "{}",
            "error": error}


def test_parts_are_written_every_n_rows_and_read_back(tmp_path):
    folder = parts_dir(tmp_path / "S.parquet")
    assert folder.name == "S.parts"
    w = PartWriter(folder, "d1", flush_rows=2, flush_seconds=1e9)
    for i in range(5):
        w.add(row(f"p{i}"))
    assert sorted(p.name for p in folder.iterdir()) == ["part-000000.parquet", "part-000001.parquet"]
    w.flush()
    assert list(read_parts(folder, "d1")["patch_id"]) == ["p0", "p1", "p2", "p3", "p4"]
    # a new writer (a restarted job) appends after the existing parts
    PartWriter(folder, "d1", flush_rows=1).add(row("p5"))
    assert (folder / "part-000003.parquet").exists()


def test_stale_broken_and_temporary_parts_are_dropped(tmp_path):
    folder = tmp_path / "S.parts"
    w = PartWriter(folder, "old", flush_rows=1)
    w.add(row("a"))
    w2 = PartWriter(folder, "new", flush_rows=1)
    w2.add(row("b"))
    (folder / "part-000007.parquet").write_bytes(b"not parquet")
    (folder / ".part-000008.tmp").write_bytes(b"half written")
    assert list(read_parts(folder, "new")["patch_id"]) == ["b"]
    assert sorted(p.name for p in folder.iterdir()) == ["part-000001.parquet"]


def test_merge_prefers_success_and_keeps_manifest_order():
    done = pd.DataFrame([row("b", None, "timeout"), row("a", "first"), row("b", "ok b"), row("a", "second"),
                         row("c", None, "e1"), row("c", None, "e2")])
    m = merge_rows(done, ["a", "b", "c"])
    assert list(m.patch_id) == ["a", "b", "c"]
    assert list(m.caption.fillna("-")) == ["first", "ok b", "-"]
    assert m.error.iloc[2] == "e2"
    assert settled_patch_ids(done) == {"a", "b"}
    assert settled_patch_ids(done, retry_errors=False) == {"a", "b", "c"}
    with pytest.raises(ValueError, match="1 patches have no caption row"):
        merge_rows(done, ["a", "b", "c", "d"])


def test_finalize_is_atomic_and_refuses_too_many_errors(tmp_path):
    out = tmp_path / "S.parquet"
    w = PartWriter(parts_dir(out), "d", flush_rows=10)
    for pid in ["a", "b", "c"]:
        w.add(row(pid))
    w.add(row("d", None, "HTTP 400"))
    w.flush()
    with pytest.raises(RuntimeError, match="1 of 4 patches failed"):
        finalize(out, ["a", "b", "c", "d"], "d", max_error_fraction=0.0)
    assert not out.exists() and parts_dir(out).is_dir()  # nothing final, parts kept
    df = finalize(out, ["a", "b", "c", "d"], "d", max_error_fraction=0.25)
    assert out.exists() and [p.name for p in parts_dir(out).iterdir()] == ["final.parquet"]
    assert (parts_dir(out) / "final.parquet").stat().st_ino == out.stat().st_ino  # a hard link, no copy
    assert list(pd.read_parquet(out).columns) == ["patch_id", "prompt", "caption", "model", "backend", "params", "error"]
    assert df.error.notna().sum() == 1
