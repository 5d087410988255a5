"""`python -m quintet.train lm CONFIG [--resume]`, the form `torchrun -m` launches."""

import sys

from quintet.train.commands import main

sys.exit(main())
