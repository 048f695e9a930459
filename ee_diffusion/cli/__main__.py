"""`python -m ee_diffusion.cli` (what `accelerate launch -m ee_diffusion.cli` runs): the `ee-diffusion` command."""

import sys

from . import main

sys.exit(main())
