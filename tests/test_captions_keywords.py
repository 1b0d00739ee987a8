"""Textual bags: keyword extraction, normalisation, de-duplication, source patch ids."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mrplip_core.captions.keywords import bag_keywords, keywords_for_slide, lemma, phrases
from mrplip_core.captions.settings import KeywordParams


def test_lemma_light():
    assert [lemma(w) for w in ["nuclei", "glands", "arteries", "processes", "mucus", "nucleus", "dense", "boxes"]] == \
        ["nucleus", "gland", "artery", "process", "mucus", "nucleus", "dense", "box"]


def test_phrases_normalise_and_split_on_stopwords():
    text = ("The image shows densely packed Lymphocytes with hyperchromatic nuclei; glands are lined by "
            "columnar epithelium. About 284 nuclei (22,640 per mm2).")
    assert phrases(text) == ["densely packed lymphocyte", "hyperchromatic nucleus", "gland", "lined",
                             "columnar epithelium", "nucleus"]
    # long runs are split into phrases of at most max_phrase_words
    assert phrases("alpha beta gamma delta epsilon", KeywordParams(max_phrase_words=2)) == \
        ["alpha beta", "gamma delta", "epsilon"]


def test_bags_collect_deduplicated_keywords_with_their_patches():
    manifest = pd.DataFrame({"patch_id": ["A", "A1", "A2", "B", "B1"], "bag_id": ["A", "A", "A", "B", "B"]})
    captions = pd.DataFrame({
        "patch_id": ["A2", "A", "A1", "B", "B1"],
        "caption": ["Gland with mitoses.", "Glands and fat.", "Fat and glands. Glands!", "Fat.", None],
        "error": [None, None, None, None, "HTTP 500"],
    })
    df = bag_keywords(captions, manifest)
    rows = {(b, k): list(p) for b, k, p in zip(df.bag_id, df.keyword, df.patch_ids)}
    assert rows == {("A", "gland"): ["A", "A1", "A2"], ("A", "fat"): ["A", "A1"], ("A", "mitosis"): ["A2"],
                    ("B", "fat"): ["B"]}
    assert list(df.keyword[df.bag_id == "A"]) == ["gland", "fat", "mitosis"]  # most patches first


def test_keywords_file(tmp_path):
    pd.DataFrame({"patch_id": ["A", "A1"], "bag_id": ["A", "A"], "x": [0, 1]}).to_parquet(tmp_path / "m.parquet")
    pd.DataFrame({"patch_id": ["A", "A1"], "caption": ["Dense nuclei.", "Dense stroma."],
                  "error": [None, None]}).to_parquet(tmp_path / "c.parquet")
    keywords_for_slide(str(tmp_path / "c.parquet"), str(tmp_path / "m.parquet"), str(tmp_path / "k.parquet"))
    t = pq.read_table(tmp_path / "k.parquet")
    assert t.schema.field("patch_ids").type == pa.list_(pa.string())
    assert t.to_pydict() == {"bag_id": ["A", "A"], "keyword": ["dense nucleus", "dense stroma"],
                             "patch_ids": [["A"], ["A1"]]}
