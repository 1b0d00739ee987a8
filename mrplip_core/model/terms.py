"""The names of the six MR-PLIP objective terms, ``L = L_bl + L_CVTA + L_MRTVA``.

One vocabulary for every layer that speaks of terms: the model builds the modules of the
active terms (its ``heads``), :mod:`mrplip_core.losses` one loss module per term, the
trainer logs one ``metrics.csv`` column per term, and the evaluation and the report say
which terms a run trained with. Plain tuples, no torch: reading a run's summary does not
load the model.
"""

from __future__ import annotations

#: ``L_bl``: image-text contrast, matching, masked and prefix language modelling.
BASELINE_TERMS: tuple[str, ...] = ("itc", "itm", "mlm", "plm")
#: Every term, in canonical order (the MR-PLIP additions CVTA and MRTVA last).
TERMS: tuple[str, ...] = (*BASELINE_TERMS, "cvta", "mrtva")
