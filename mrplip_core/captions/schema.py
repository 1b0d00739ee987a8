"""Column contracts of the captioning stage's artifacts."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

#: Columns of ``results/captions/{slide}.parquet``, one row per patch of the tile manifest.
CAPTION_COLUMNS: dict[str, str] = {
    "patch_id": "string",  # as in results/tiles/{slide}.parquet
    "prompt": "string",  # the instruction the caption answers (per magnification, from config)
    "caption": "string",  # the generated text; null when the request failed
    "model": "string",  # model id (served name, model directory, or the morphology version)
    "backend": "string",  # openai | transformers | morphology
    "params": "string",  # JSON of the generation parameters that produced the caption
    "error": "string",  # null when ok; otherwise why this patch has no caption
}

#: Columns of ``results/keywords/{slide}.parquet``, one row per (bag, keyword).
KEYWORD_COLUMNS: dict[str, str] = {
    "bag_id": "string",  # the bag's root patch id (tile manifest ``bag_id``)
    "keyword": "string",  # normalised keyword or phrase (lowercase, light lemmas, no stopwords)
    "patch_ids": "object",  # list of the patch ids whose captions contain it, manifest order
}

CAPTION_ARROW_SCHEMA = pa.schema([(c, pa.string()) for c in CAPTION_COLUMNS])
KEYWORD_ARROW_SCHEMA = pa.schema(
    [("bag_id", pa.string()), ("keyword", pa.string()), ("patch_ids", pa.list_(pa.string()))]
)


_EMPTY_CAPTIONS = pd.DataFrame({c: pd.Series(dtype=t) for c, t in CAPTION_COLUMNS.items()})


def empty_captions() -> pd.DataFrame:
    """A captions table with the right columns and no rows."""
    return _EMPTY_CAPTIONS.copy()
