"""`python -m proxy.cli ...`: the `vgate` command without its console script."""

import sys

from proxy.cli.main import main

sys.exit(main())
