"""Captioning stage: a text description of every patch, and the keywords of each bag.

Artifacts (one file per slide, written atomically):

- ``results/captions/{slide}.parquet``: :data:`~mrplip_core.captions.schema.CAPTION_COLUMNS`;
- ``results/keywords/{slide}.parquet``: :data:`~mrplip_core.captions.schema.KEYWORD_COLUMNS`.

Backends (``captions.backend`` in the config):

- ``openai``: any OpenAI-compatible chat-completions endpoint, normally a vLLM server with
  Quilt-LLaVA (converted by :mod:`mrplip_core.convert_llava`), either started by
  the job itself or one the user already runs (:mod:`~mrplip_core.captions.openai_backend`);
- ``transformers``: in-process ``generate()`` of an HF LLaVA model directory
  (:mod:`~mrplip_core.captions.transformers_backend`);
- ``morphology``: an offline, deterministic captioner that describes what it measures in the
  patch (stain balance, nuclei, tissue fraction, texture). It is not a language model; its
  rows say ``backend = morphology`` (:mod:`~mrplip_core.captions.morphology`).

Resumability (:mod:`~mrplip_core.captions.parts`): results are appended to part files as
they arrive; a restarted job skips what is already captioned.
"""
