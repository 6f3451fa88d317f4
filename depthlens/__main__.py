"""``python -m depthlens``: the same as the ``depthlens`` command."""

import sys

from depthlens.apps.cli import main

sys.exit(main())
