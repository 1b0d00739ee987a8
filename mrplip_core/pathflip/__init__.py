"""PathFLIP (Liu et al., AAAI 2026): slide-level, fine-grained language-image pretraining.

This package holds the stages of the second system, on the same tiles and features as
MR-PLIP. So far: slide captions (``captions.py``: a caption, or the reason there is none, per
slide) and their region-level sub-captions (``subcaptions.py``: a deterministic splitter whose
pieces are character spans of the caption; ``llm_split.py``: a language model's findings, with
that splitter as the fallback of an invalid answer); ``plan.py`` is the stage's plan for
``rules/subcaptions.smk`` and ``cli.py`` its ``mrplip`` verbs.
"""
