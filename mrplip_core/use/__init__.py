"""Using the trained models: text-to-region localisation on slides, and embeddings.

* :mod:`~mrplip_core.use.models`: resolve ``--model`` (a run folder or a run name) to a PathFLIP
  or an MR-PLIP export by its ``model.json`` format, and score a slide's patches against texts.
* :mod:`~mrplip_core.use.patches`: a slide's patch features (level-0 px boxes, magnification)
  read from ``results/features/{encoder}/{slide}.h5``.
* :mod:`~mrplip_core.use.localize`: ``mrplip localize``: per-patch scores (Parquet), a heatmap
  PNG and the top region as QuPath GeoJSON (level-0 px), per (slide, query).
* :mod:`~mrplip_core.use.embed`: ``mrplip embed``: tile, slide and text embeddings into a
  self-describing HDF5 file.
* :mod:`~mrplip_core.use.plan`: what ``rules/localize.smk`` runs (plain Python, no torch).

This layer sits above ``evaluation`` (it reuses its tile reading and frozen-encoder embedders,
so tile embeddings are the evaluation stage's) and below ``report`` and ``cli``.
"""
