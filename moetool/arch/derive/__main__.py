"""``python -m moetool.arch.derive``: regenerate the derived family table."""

import sys

from moetool.arch.derive.generate import main

sys.exit(main())
