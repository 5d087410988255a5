import sys

from quintet.cli import main

sys.exit(main())
