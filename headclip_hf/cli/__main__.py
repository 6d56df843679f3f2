"""`python -m headclip_hf.cli` (e.g. under `accelerate launch -m headclip_hf.cli ...`): the `headclip` command."""

import sys

from . import main

sys.exit(main())
