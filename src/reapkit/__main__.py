"""``python -m reapkit``: the ``reapkit`` command. SIGHUP is ignored already (``_hangup``,
imported first by the package) until ``reapkit run`` can reload or another command installs
its own handler, as with the console script."""

import sys

from .cli import main

sys.exit(main())
