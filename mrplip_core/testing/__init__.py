"""Test helpers: data and models whose structure or right answers are known, built offline.

* :mod:`~mrplip_core.testing.known_answers`: an embedder and colour tiles on which zero-shot
  and probes have exact answers; an untrained MR-PLIP run folder;
* :mod:`~mrplip_core.testing.synthetic_corpus`: a small pretraining corpus in the real
  artifact formats (tiles, features, captions, keywords) and a tokenizer;
* :mod:`~mrplip_core.testing.tiny_llava`: tiny random-weight LLaVA checkpoints, original and
  HF format (``python -m mrplip_core.testing.tiny_llava DST``).

Used by ``tests/`` and ``bench/``. This package may import any layer of ``mrplip_core``;
no other module of ``mrplip_core`` imports it (``tests/test_layers.py``). The synthetic
slide of the demo is not a test helper: it stays in :mod:`mrplip_core.wsi.synthetic`.
"""
