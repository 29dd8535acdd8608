"""``python -m smoe``: the command line (what ``smoe train --nproc N`` hands to torchrun)."""

import sys

from smoe.cli.main import main

sys.exit(main())
