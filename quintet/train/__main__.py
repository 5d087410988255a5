"""`python -m quintet.train lm CONFIG [--resume]`, the form `torchrun -m` launches."""

import sys

from quintet.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
