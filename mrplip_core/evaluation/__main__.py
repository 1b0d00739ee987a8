"""``python -m mrplip_core.evaluation VERB ...``: the evaluation verbs without the main CLI.

The same verbs are ``mrplip eval-features|evaluate|evaluate-retrieval|eval-summary|report`` once
:func:`mrplip_core.evaluation.cli.register` is wired into ``mrplip_core.cli``.
"""

from mrplip_core.evaluation.cli import main

raise SystemExit(main())
