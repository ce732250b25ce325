"""``python -m optuna_ctpe.cli``: the ``optuna-ctpe`` command without its console script."""

import sys

from optuna_ctpe.cli.root import main


sys.exit(main())
