import sys

from crossvit.cli import main

sys.exit(main())
