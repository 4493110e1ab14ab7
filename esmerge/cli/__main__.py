"""``python -m esmerge.cli``: the same as ``python -m esmerge`` and the ``esmerge`` command."""
import sys

from esmerge.cli import main

sys.exit(main())
