"""``python -m lorafit``: the ``lorafit`` command, as torchrun launches it (``torchrun ... -m lorafit train``)."""

import sys

from lorafit.cli import main

sys.exit(main())
