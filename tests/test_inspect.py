"""`mrplip inspect` fits the terminal: a captions table with 600-character captions prints
as a table no wider than the terminal, and --full prints the whole captions."""

from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mrplip_core.captions.schema import CAPTION_ARROW_SCHEMA
from mrplip_core.cli import main as mrplip
from mrplip_core.io.inspect import ELLIPSIS, describe

CAPTION = ("The tissue shows densely packed glands lined by columnar epithelium with enlarged, "
           "hyperchromatic nuclei and scattered mitoses.\nThe stroma between them is desmoplastic. " * 5)[:600]


@pytest.fixture()
def captions(tmp_path):
    rows = [{"patch_id": f"TCGA-AA-3521_5x_{i:04d}", "prompt": "Can you describe the main features visible in this "
             "histopathology image?", "caption": CAPTION if i != 1 else None, "model": "morphology-v1",
             "backend": "morphology", "params": json.dumps({"max_tokens": 256, "temperature": 0.0}),
             "error": None if i != 1 else "HTTP 500 from the server"} for i in range(3)]
    path = tmp_path / "TCGA-AA-3521.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=CAPTION_ARROW_SCHEMA), path)
    return path


@pytest.mark.parametrize("columns", [140, 80, 40])
def test_sample_rows_fit_the_terminal(captions, columns, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", str(columns))  # what shutil.get_terminal_size() reads first
    assert mrplip(["inspect", str(captions), "--rows", "3"]) == 0
    text = capsys.readouterr().out
    table = text.split("sample rows:\n", 1)[1].splitlines()
    assert len(table) == 2 + 3 + 1  # header, rule, three rows, the note
    assert all(len(line) <= columns for line in table[:-1]), [len(line) for line in table]
    assert CAPTION[:100] not in text and ELLIPSIS in table[2] and "--full" in table[-1]
    header, rows = table[0].split(), [re.split(r"\s{2,}", line) for line in table[2:5]]
    assert header[0] == "patch_id" and header[-1] == "error"
    if columns == 140:  # every column, the failed row's null caption and its error
        assert header == ["patch_id", "prompt", "caption", "model", "backend", "params", "error"]
        assert rows[1][2] == "null" and rows[1][-1].startswith("HTTP 500") and rows[0][-1] == "null"
        assert "left out" not in table[-1]
    else:  # middle columns give way to an ellipsis column
        assert ELLIPSIS in header and "columns left out" in table[-1]
    if columns >= 80:  # the column naming the row stays whole
        assert [r[0] for r in rows] == [f"TCGA-AA-3521_5x_{i:04d}" for i in range(3)] and "caption" in header


def test_full_prints_whole_values(captions, capsys):
    assert mrplip(["inspect", str(captions), "--rows", "2", "--full"]) == 0
    text = capsys.readouterr().out
    assert "  caption: " + CAPTION.replace("\n", "\n    ") in text  # all 600 characters, lines indented
    assert "  error: HTTP 500 from the server" in text and "[1]" in text and "[2]" not in text


def test_a_table_at_a_given_width_and_hdf5_summaries(captions, tmp_path):
    lines = describe(captions, 1, width=60).split("sample rows:\n", 1)[1].splitlines()
    assert max(len(line) for line in lines[:-1]) <= 60 and lines[2].startswith("TCGA-AA-3521_5x_0000")
    h5 = tmp_path / "f.h5"
    with h5py.File(h5, "w") as f:
        g = f.create_group("5x")
        g.attrs["encoder"] = "demo"
        g.create_dataset("features", data=np.arange(12, dtype=np.float16).reshape(3, 4))
        g.create_dataset("patch_id", data=np.array([b"a", b"b", b"c"]))
    text = describe(h5, 2)
    assert "5x/: group" in text and "features: dataset (3, 4) float16" in text and "encoder = 'demo'" in text
    assert "first: ['a', 'b']" in text
