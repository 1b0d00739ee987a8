"""The HTML report: ``build_report(results, out)`` writes ``out/index.html`` and ``out/img/``.

Sections: overview of the artifacts, slides with tissue QC, sample multi-resolution bags
with captions, pretraining loss curves per term, evaluation tables (baselines, runs,
ablations, k-shot, retrieval) with confusion matrices, and the paper's published figures.
"""

from mrplip_core.report.build import SECTIONS, build_report

__all__ = ["SECTIONS", "build_report"]
