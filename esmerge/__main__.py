import sys

from esmerge.cli import main

sys.exit(main())
