import sys

from initopt.cli import main

sys.exit(main())
