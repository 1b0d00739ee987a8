"""Rule-based sub-captions: a slide caption split into region-level findings, as character spans.

PathFLIP (Liu et al., AAAI 2026) learns one text-conditioned region embedding per sub-caption:
a piece of the slide's report that describes one finding. The embedded splitter is
deterministic and needs no model:

1. **Sentences**: split after ``.``, ``!`` or ``?`` followed by white space and a capital letter,
   a digit or an opening bracket; not after common abbreviations (``e.g.``, ``approx.``, ``Dr.``,
   single letters as in ``T. pallidum``) and never inside a number (``1.5 cm``).
2. **Clauses**: a sentence that lists several findings is split where its clauses meet: at
   ``;``, and at ``, and`` / ``, while`` / ``, whereas`` / ``, but`` when the part on each side
   holds at least ``min_clause_words`` words and a finding of its own (a verb such as *is*,
   *shows*, *reveals*, or a state such as *absent*, *negative*, *free*), so that a list of
   nouns (``right pelvic, retroperitoneal, and left pelvic nodes``) stays whole.
3. Pieces are trimmed of white space; a piece of fewer than ``min_words`` words (a lone
   heading such as ``Diagnosis:``) is joined to the next one (or the previous, at the end).

Every piece is an exact span of the caption: ``caption[start:end] == text``. This is
``pathflip.subcaptions.method: rules``; the LLM splitter (``method: llm``,
:mod:`~mrplip_core.pathflip.llm_split`) falls back to it for a slide whose model answer is
invalid, and records that (``method`` ``rules-fallback`` and the ``fallback_reason``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd

#: Words after which a full stop does not end a sentence (lower case, without the stop).
ABBREVIATIONS = frozenset(
    "e.g i.e approx appr ca cf dr etc fig figs incl max min mr mrs ms no nos prof resp st vs viz vol "
    "ant post inf sup lat med".split()
)
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s+[\"'(\[]?[A-Z0-9])")
_CLAUSE_BREAK = re.compile(r";\s+|,\s+(?=(?:and|while|whereas|but)\s)", re.I)
#: A clause states a finding when it holds one of these (verbs and states of report language).
_FINDING = re.compile(
    r"\b(?:is|are|was|were|has|have|had|shows?|showed|shown|reveals?|revealed|exhibits?|exhibited|"
    r"demonstrates?|demonstrated|indicates?|indicated|involves?|involved|extends?|extending|measures?|"
    r"measured|contains?|consists?|remains?|appears?|suggests?|confirms?|confirmed|lacks?|identified|"
    r"noted|seen|observed|present|absent|negative|positive|free|found|invades?|invading|displays?)\b",
    re.I,
)
_WORD = re.compile(r"[A-Za-z0-9][\w\-/%+.]*")


@dataclass(frozen=True)
class Piece:
    """One sub-caption: ``text == caption[start:end]`` (character offsets)."""

    text: str
    start: int
    end: int


def count_words(text: str) -> int:
    """Words of ``text`` as the splitter counts them (runs starting with a letter or digit)."""
    return len(_WORD.findall(text))


def _trimmed(caption: str, start: int, end: int) -> Piece | None:
    """The span ``[start, end)`` without surrounding white space (None when nothing is left)."""
    while start < end and caption[start].isspace():
        start += 1
    while end > start and caption[end - 1].isspace():
        end -= 1
    return Piece(caption[start:end], start, end) if end > start else None


def _is_abbreviation(caption: str, stop: int) -> bool:
    """Whether the full stop at ``stop`` closes an abbreviation or a single initial."""
    m = re.search(r"([A-Za-z][A-Za-z.]*)$", caption[:stop])
    if not m:
        return False
    word = m.group(1).rstrip(".").lower()
    return word in ABBREVIATIONS or (len(word) == 1 and caption[stop] == ".")


def sentences(caption: str) -> list[Piece]:
    """The caption's sentences, as spans."""
    out: list[Piece] = []
    start = 0
    for m in _SENTENCE_END.finditer(caption):
        if caption[m.start()] == "." and _is_abbreviation(caption, m.start()):
            continue
        piece = _trimmed(caption, start, m.end())
        if piece:
            out.append(piece)
        start = m.end()
    tail = _trimmed(caption, start, len(caption))
    if tail:
        out.append(tail)
    return out


def clauses(caption: str, sentence: Piece, min_clause_words: int = 4) -> list[Piece]:
    """``sentence`` split into the findings it lists (itself when it lists one)."""
    cuts = [sentence.start]
    for m in _CLAUSE_BREAK.finditer(caption, sentence.start, sentence.end):
        left = caption[cuts[-1]:m.start()]
        right = caption[m.end():sentence.end]
        semicolon = caption[m.start()] == ";"
        if count_words(left) >= min_clause_words and count_words(right) >= min_clause_words and (
                semicolon or (_FINDING.search(left) and _FINDING.search(right))):
            cuts.append(m.end())
    bounds = cuts + [sentence.end]
    pieces = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        # a clause ends before the separator that starts the next one ("; " or ", ")
        end = b
        if b != sentence.end:
            end = len(caption[:b].rstrip().rstrip(";,"))
        piece = _trimmed(caption, a, end)
        if piece:
            pieces.append(piece)
    return pieces


def _join_short(caption: str, pieces: list[Piece], min_words: int) -> list[Piece]:
    """Join every piece of fewer than ``min_words`` words to the next one (the last: to the
    previous one), so that no sub-caption is empty or a lone word."""
    out: list[Piece] = []
    pending: Piece | None = None
    for p in pieces:
        if pending is not None:
            p = Piece(caption[pending.start:p.end], pending.start, p.end)
            pending = None
        if count_words(p.text) < min_words:
            pending = p
        else:
            out.append(p)
    if pending is not None:
        if out:
            last = out.pop()
            out.append(Piece(caption[last.start:pending.end], last.start, pending.end))
        elif count_words(pending.text) >= 1:
            out.append(pending)
    return out


def split_caption(caption: str, *, split_clauses: bool = True, min_words: int = 2,
                  min_clause_words: int = 4) -> list[Piece]:
    """Sub-captions of a slide caption: sentences, then clauses; none empty or a lone word
    (unless the whole caption is one word). Spans index into ``caption`` as given."""
    pieces: list[Piece] = []
    for sentence in sentences(caption):
        pieces += clauses(caption, sentence, min_clause_words) if split_clauses else [sentence]
    return _join_short(caption, pieces, min_words)


#: Columns of ``results/subcaptions/{slide}.parquet``: ``start``/``end`` are character offsets
#: into the caption (null for an LLM finding that is not a verbatim span of it); ``method`` is
#: ``rules``, ``llm`` or ``rules-fallback`` (the rules, because the model's answer for this slide
#: was invalid: ``fallback_reason`` says how; null otherwise).
COLUMNS = ["slide_id", "subcaption_id", "text", "start", "end", "method", "fallback_reason"]
DTYPES = {"slide_id": "string", "subcaption_id": "string", "text": "string", "start": "Int64", "end": "Int64",
          "method": "string", "fallback_reason": "string"}


def rows_table(slide_id: str, rows: list[tuple[str, int | None, int | None]], method: str,
               fallback_reason: str | None = None) -> pd.DataFrame:
    """One slide's sub-captions ``(text, start, end)`` as a table of :data:`COLUMNS`;
    ``subcaption_id`` is ``{slide}_sc{i:03d}``, stable while the caption and settings are."""
    df = pd.DataFrame(
        [{"slide_id": slide_id, "subcaption_id": f"{slide_id}_sc{i:03d}", "text": text, "start": start, "end": end,
          "method": method, "fallback_reason": fallback_reason} for i, (text, start, end) in enumerate(rows)],
        columns=COLUMNS,
    )
    return df.astype(DTYPES)


def subcaption_table(slide_id: str, caption: str | None, *, split_clauses: bool = True, min_words: int = 2,
                     fallback_reason: str | None = None) -> pd.DataFrame:
    """The rule-based sub-captions of one slide as a table (no rows when the slide has no usable
    caption: ``results/slide_captions.parquet`` says why). With ``fallback_reason`` the rows are
    the LLM splitter's fallback (``method`` ``rules-fallback``)."""
    pieces = split_caption(caption, split_clauses=split_clauses, min_words=min_words) if caption else []
    method = "rules" if fallback_reason is None else "rules-fallback"
    return rows_table(slide_id, [(p.text, p.start, p.end) for p in pieces], method, fallback_reason)
