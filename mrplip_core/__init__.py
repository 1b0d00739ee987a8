"""mrplip_core: the library behind the MR-PLIP Snakemake workflow.

One subpackage per stage (``wsi``, ...); no Snakemake imports anywhere in this package.
"""

__version__ = "0.1.0"
