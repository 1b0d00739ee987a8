"""Textual bags: keywords and short phrases from the captions of each visual bag.

A *bag* is a parent patch and all its descendants (tile manifest ``bag_id``). For each bag,
candidate phrases are the maximal runs of words between stopwords and punctuation in its
captions (as in RAKE, Rose et al. 2010), normalised (lowercase, light lemmatisation, no
digits), split into chunks of at most ``max_phrase_words`` words, and de-duplicated; each
keeps the ids of the patches whose captions produced it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mrplip_core.captions.schema import KEYWORD_ARROW_SCHEMA, KEYWORD_COLUMNS
from mrplip_core.captions.settings import KeywordParams
from mrplip_core.io.atomic import atomic_path

#: English function words (closed classes) plus vague verbs common in captions.
STOPWORDS: frozenset[str] = frozenset("""
a about above across after again against all almost along also although am among an and another any
are around as at away be because been before being below between both but by can could did do does
doing done down during each either else enough etc even ever every few for from further had has have
having he her here hers him his how however i if in into is it its itself just least less like made
make many may me might more most much must my near neither no nor not now of off often on once one
only or other others otherwise our out over own per perhaps quite rather really same several she
should since so some such than that the their them then there these they this those though through
thus to too toward towards under until up upon us very via was we were what when where whereas
whether which while who whom whose why will with within without would yet you your
can't cannot there's it's
describe described describes description main features feature visible image images picture
detected detect approximately roughly mostly median wide seems seem shown showing show shows
including include includes various variety well throughout entirely
""".split())

#: Irregular plurals of histology words.
_IRREGULAR = {
    "nuclei": "nucleus", "mitoses": "mitosis", "metastases": "metastasis", "necroses": "necrosis",
    "fibroses": "fibrosis", "stromata": "stroma", "lumina": "lumen", "foci": "focus", "bacilli": "bacillus",
    "criteria": "criterion", "data": "data", "apoptoses": "apoptosis", "atypias": "atypia",
}
#: Words ending in s that are not plurals.
_KEEP_S = {"mucus", "nucleus", "villus", "focus", "virus", "fungus", "bacillus", "lens", "os", "canalis",
           "this", "its", "is", "was", "has", "gas", "plus", "thus", "versus", "status", "process",
           "less", "loss", "mass", "glass", "cross", "series", "species", "lymphatics"}

_TOKEN = re.compile(r"[a-z][a-z\-']*[a-z]|[a-z]")
_SPLIT = re.compile(r"[.,;:!?()\[\]{}\"/]|\s-\s|\n")


def lemma(word: str) -> str:
    """Light lemmatisation of a lowercase word: plural nouns to singular, nothing else.

    ``nuclei -> nucleus``, ``arteries -> artery``, ``glands -> gland``, ``processes -> process``;
    verbs and adjectives are left as they are (``dense``, ``stained``).
    """
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word in _KEEP_S or len(word) <= 3 or not word.endswith("s"):
        return word
    if word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "ches", "shes", "zes")):
        return word[:-2]
    return word[:-1]


def phrases(text: str, params: KeywordParams = KeywordParams()) -> list[str]:
    """Normalised keyword phrases of one text, in order of appearance, de-duplicated."""
    stop = STOPWORDS | {w.lower() for w in params.extra_stopwords}
    out: list[str] = []
    seen: set[str] = set()
    for segment in _SPLIT.split(text.lower()):
        run: list[str] = []
        for raw in segment.split():
            word = raw.strip("'-")
            if any(ch.isdigit() for ch in word) or word in stop or not _TOKEN.fullmatch(word or "-"):
                _flush(run, out, seen, params)
                run = []
                continue
            word = lemma(word)
            if len(word) < params.min_chars or word in stop:
                _flush(run, out, seen, params)
                run = []
                continue
            run.append(word)
        _flush(run, out, seen, params)
    return out


def _flush(run: list[str], out: list[str], seen: set[str], params: KeywordParams) -> None:
    n = max(1, params.max_phrase_words)
    for i in range(0, len(run), n):
        phrase = " ".join(run[i : i + n])
        if phrase and phrase not in seen:
            seen.add(phrase)
            out.append(phrase)


def bag_keywords(captions: pd.DataFrame, manifest: pd.DataFrame, params: KeywordParams = KeywordParams()) -> pd.DataFrame:
    """One row per (bag, keyword) with the source patch ids (KEYWORD_COLUMNS).

    ``captions``: patch_id, caption, error (failed rows are ignored). ``manifest``: patch_id,
    bag_id (the tile manifest; its order gives the order of patch ids). Rows are ordered by
    bag (manifest order), then by how many patches share the keyword (most first), then by
    first appearance.
    """
    order = {pid: i for i, pid in enumerate(manifest["patch_id"])}
    bag_of = dict(zip(manifest["patch_id"], manifest["bag_id"]))
    bag_rank = {b: i for i, b in enumerate(dict.fromkeys(manifest["bag_id"]))}
    ok = captions[captions["error"].isna() & captions["caption"].notna()]
    ok = ok[ok["patch_id"].isin(order)]
    ok = ok.assign(_o=ok["patch_id"].map(order)).sort_values("_o")
    found: dict[tuple[str, str], list[str]] = {}
    first: dict[tuple[str, str], int] = {}
    for pid, text in zip(ok["patch_id"], ok["caption"]):
        bag = bag_of[pid]
        for phrase in phrases(text, params):
            key = (bag, phrase)
            if key not in found:
                found[key] = []
                first[key] = len(first)
            found[key].append(pid)
    rows = sorted(found.items(), key=lambda kv: (bag_rank[kv[0][0]], -len(kv[1]), first[kv[0]]))
    return pd.DataFrame(
        {
            "bag_id": pd.Series([k[0] for k, _ in rows], dtype="string"),
            "keyword": pd.Series([k[1] for k, _ in rows], dtype="string"),
            "patch_ids": pd.Series([list(v) for _, v in rows], dtype="object"),
        },
        columns=list(KEYWORD_COLUMNS),
    )


def write_keywords(df: pd.DataFrame, out: str) -> None:
    """Write a keywords table atomically (``patch_ids`` as a list<string> column)."""
    table = pa.Table.from_pandas(df, schema=KEYWORD_ARROW_SCHEMA, preserve_index=False)
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)


def keywords_for_slide(captions_path: str, manifest_path: str, out: str, params: KeywordParams = KeywordParams()) -> pd.DataFrame:
    """``results/keywords/{slide}.parquet`` from the slide's captions and tile manifest."""
    captions = pd.read_parquet(captions_path, columns=["patch_id", "caption", "error"])
    manifest = pd.read_parquet(manifest_path, columns=["patch_id", "bag_id"])
    df = bag_keywords(captions, manifest, params)
    write_keywords(df, out)
    return df


def unique_keywords(df: pd.DataFrame) -> Iterable[str]:
    """All distinct keywords of a keywords table (for the text encoder)."""
    return dict.fromkeys(df["keyword"]).keys()
