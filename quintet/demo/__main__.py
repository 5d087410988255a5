"""`python -m quintet.demo [--out runs/demo] [--full] [--skip-vitar]`."""

import sys

from quintet.demo.lifecycle import main

sys.exit(main())
