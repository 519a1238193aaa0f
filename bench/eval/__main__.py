"""``python -m bench.eval``: the quality evaluation (same as ``python bench/quality.py``)."""
import sys

from .quality import main

sys.exit(main())
