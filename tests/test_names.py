"""File names made from slide ids and region kinds (io/names.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mrplip_core.io.names import safe_filename


def test_a_safe_name_is_kept_as_it_is() -> None:
    assert safe_filename("TCGA-A1-A0SB-01Z-00-DX1.svs") == "TCGA-A1-A0SB-01Z-00-DX1.svs"


@pytest.mark.parametrize("name", ["tumour/necrosis", "..", ".", "", "a b", "néc²rose", "../../etc", "x\\y"])
def test_an_unsafe_name_becomes_one_visible_path_component(name, tmp_path) -> None:
    safe = safe_filename(name)
    assert safe and not safe.startswith(".") and safe.isascii()
    assert Path(safe).name == safe and (tmp_path / safe).parent == tmp_path


def test_names_differing_only_in_replaced_characters_do_not_share_a_file() -> None:
    names = ["a/b", "a_b", "a b", "a\\b", "a:b"]
    assert len({safe_filename(n) for n in names}) == len(names)
    assert safe_filename("a/b") == safe_filename("a/b")  # stable across calls and runs
