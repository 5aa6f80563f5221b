"""reapkit-prometheus: a reapkit observer exporting to Prometheus.

Add it to a policy with ``[[observer]]`` ``name = "prometheus"`` (options ``host``, ``port``,
``path``); the reaper starts its HTTP endpoint in its own trio nursery. Public names only;
the code lives in private modules.
"""

from ._metrics import OUTCOMES as OUTCOMES
from ._observer import PrometheusObserver as PrometheusObserver
from ._observer import PrometheusOptions as PrometheusOptions
from ._version import __version__ as __version__
