"""``python -m saeuron.cli``: the same as ``saeuron``."""
import sys

from . import main

sys.exit(main())
