"""``python -m presso`` (and ``torchrun ... -m presso compile ...``): the command line."""
import sys

from presso.cli import main

sys.exit(main())
