"""PathFLIP sub-captions: slide captions in, region-level sub-captions out, as spans of the caption."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_features_workflow import snakemake

from mrplip_core.pathflip.captions import CaptionFileError, read_caption_file, slide_captions
from mrplip_core.pathflip.plan import SubcaptionsPlan
from mrplip_core.pathflip.subcaptions import split_caption, subcaption_table

REPO = Path(__file__).resolve().parents[1]


def texts(caption: str, **kw) -> list[str]:
    return [p.text for p in split_caption(caption, **kw)]


def test_sentences_then_clauses_that_state_their_own_finding() -> None:
    caption = ("Invasive ductal carcinoma, grade 2, measures 1.5 cm. Both vascular and perineural invasion are "
               "absent, and the surgical margins are free of tumour. Nodes from the right pelvic, retroperitoneal, "
               "and left pelvic areas show no metastasis; the prostate shows nodular hyperplasia.")
    assert texts(caption) == [
        "Invasive ductal carcinoma, grade 2, measures 1.5 cm.",  # no split inside 1.5
        "Both vascular and perineural invasion are absent",
        "and the surgical margins are free of tumour.",
        "Nodes from the right pelvic, retroperitoneal, and left pelvic areas show no metastasis",  # a list stays
        "the prostate shows nodular hyperplasia.",
    ]
    assert texts(caption, split_clauses=False)[1] == (
        "Both vascular and perineural invasion are absent, and the surgical margins are free of tumour.")


def test_abbreviations_headings_and_one_word_pieces() -> None:
    caption = "Diagnosis: Adenocarcinoma, e.g. of the colon, approx. 3 cm. Benign. The margins are clear."
    pieces = split_caption(caption)
    assert [p.text for p in pieces] == ["Diagnosis: Adenocarcinoma, e.g. of the colon, approx. 3 cm.",
                                        "Benign. The margins are clear."]  # a one-word sentence joins the next
    assert all(caption[p.start:p.end] == p.text for p in pieces)
    assert texts("Benign.") == ["Benign."] and texts("   ") == [] and texts("") == []


def test_all_real_tcga_captions_split_into_spans(shared_data: Path) -> None:
    df = pd.read_csv(shared_data / "captions" / "SlideBench-Caption-TCGA.csv", encoding="utf-8-sig")
    assert len(df) == 732
    counts = []
    for caption in df["Caption"]:
        pieces = split_caption(caption)
        counts.append(len(pieces))
        for p in pieces:
            assert caption[p.start:p.end] == p.text and p.text.strip() == p.text
            assert len(re.findall(r"[A-Za-z0-9]+", p.text)) >= 2, p.text
        # together the pieces cover every word of the caption, in order (only the separators
        # between clauses, ", " and "; ", belong to no piece)
        def words(text: str) -> str:
            return re.sub(r"[\s,;]+", "", text)

        assert words("".join(p.text for p in pieces)) == words(caption)
    # measured: min 4, median 8, max 16 (the closing note quotes these)
    assert min(counts) >= 2 and 5 <= statistics.median(counts) <= 12 and max(counts) <= 30, (
        min(counts), statistics.median(counts), max(counts))


def test_every_slide_gets_a_caption_or_the_reason_it_has_none(tmp_path: Path) -> None:
    table = pd.DataFrame({"slide_id": ["a", "b", "c", "d", "e"], "path": "x.svs",
                          "caption": ["Table caption of a.", None, "   ", "x" * 20_000, "Table caption of e."]}
                         ).set_index("slide_id", drop=False)
    given = pd.DataFrame({"slide_id": ["e", "zz"], "caption": ["The file's caption of e wins.", "Orphan."]})
    df = slide_captions(table, given, max_chars=10_000).set_index("slide_id")
    assert df.loc["a", "status"] == "ok" and df.loc["a", "source"] == "table"
    assert df.loc["b", "status"] == "missing" and "no caption" in df.loc["b", "reason"]
    assert df.loc["c", "status"] == "empty"
    assert df.loc["d", "status"] == "too_long" and "20000 characters" in df.loc["d", "reason"]
    assert pd.isna(df.loc["d", "caption"])
    assert df.loc["e", "caption"] == "The file's caption of e wins." and df.loc["e", "source"] == "file"
    assert df.loc["zz", "status"] == "not_in_slide_table"
    assert subcaption_table("d", None).empty and list(subcaption_table("a", "Tumour is present. Margins are clear.")["subcaption_id"]) == [
        "a_sc000", "a_sc001"]


def test_a_caption_file_that_cannot_be_used_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "caps.csv"
    bad.write_text("slide,text\na,b\n")
    with pytest.raises(CaptionFileError, match=r"caps.csv lacks column\(s\) \['slide_id', 'caption'\]"):
        read_caption_file(bad)
    dup = tmp_path / "dup.tsv"
    dup.write_text("slide_id\tcaption\na\tone\na\ttwo\n")
    with pytest.raises(CaptionFileError, match=r"dup.tsv gives slide\(s\) \['a'\] more than one caption"):
        read_caption_file(dup)
    with pytest.raises(CaptionFileError, match="not found"):
        read_caption_file(tmp_path / "none.parquet")


def test_the_job_unit_is_not_a_trigger() -> None:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    base = SubcaptionsPlan.from_config(config)
    sharded = SubcaptionsPlan.from_config({"pathflip": {**config["pathflip"], "subcaptions": {
        **config["pathflip"]["subcaptions"], "slides_per_job": 100}}})
    assert base.per_slide and not sharded.per_slide and sharded.subcaptions_trigger == base.subcaptions_trigger


def test_subcaptions_stage_in_snakemake(tmp_path: Path) -> None:
    """`snakemake subcaptions` from a caption file: every slide recorded, a rerun does nothing, and
    a changed splitter setting reruns only the sub-caption jobs."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config.update(slides="slides.tsv", demo=[])
    config["pathflip"]["captions"] = "captions.tsv"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "slides.tsv").write_text("slide_id\tpath\nS1\tS1.svs\nS2\tS2.svs\nS3\tS3.svs\n")
    (tmp_path / "captions.tsv").write_text(
        "slide_id\tcaption\nS1\tA tumour is present in the upper left region, and the stroma is fibrotic. "
        "Necrosis is absent.\nS2\t \nS9\tNot in the table.\n")
    snakemake(tmp_path, "subcaptions")
    table = pd.read_parquet(tmp_path / "results" / "slide_captions.parquet").set_index("slide_id")
    assert table["status"].to_dict() == {"S1": "ok", "S2": "empty", "S3": "missing", "S9": "not_in_slide_table"}
    s1 = pd.read_parquet(tmp_path / "results" / "subcaptions" / "S1.parquet")
    assert list(s1["text"]) == ["A tumour is present in the upper left region", "and the stroma is fibrotic.",
                                "Necrosis is absent."]
    assert pd.read_parquet(tmp_path / "results" / "subcaptions" / "S3.parquet").empty
    assert "Nothing to be done" in snakemake(tmp_path, "-n", "subcaptions")
    overlay = {"pathflip": {"subcaptions": {"split_clauses": False}}}
    (tmp_path / "overlay.yaml").write_text(json.dumps(overlay))
    out = snakemake(tmp_path, "-n", "--configfile", str(tmp_path / "config.yaml"), str(tmp_path / "overlay.yaml"),
                    "--", "subcaptions")
    assert set(re.findall(r"^rule (\w+):", out, re.M)) == {"subcaptions_slide", "subcaptions"}, out[-2000:]


def test_a_hash_inside_a_caption_is_text_not_a_comment(tmp_path: Path) -> None:
    from mrplip_core.wsi.table import read_slide_table

    (tmp_path / "slides.tsv").write_text("# cohort of two\nslide_id\tpath\tcaption\tdiagnosis\n"
                                         "A\ta.svs\tInvasive carcinoma, block #2, margins clear.\tLUAD\n"
                                         "# B\tb.svs\tcommented out\tLUSC\n")
    table = read_slide_table(tmp_path / "slides.tsv")
    assert list(table.index) == ["A"]
    assert table.at["A", "caption"] == "Invasive carcinoma, block #2, margins clear." and table.at["A", "diagnosis"] == "LUAD"
