"""``python -m hdaf ...``: the same as the ``hdaf`` console script (``hdaf.cli:main``)."""
import sys

from .cli import main

sys.exit(main())
