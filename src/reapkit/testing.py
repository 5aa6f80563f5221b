"""Helpers for testing policies and plugins without killing anything (and, in sandboxes, with).

* :func:`make_candidate`, :func:`read_candidates` and :func:`make_situation` build what a
  selector gets; :func:`run_selector` calls one as the engine does and checks its ranking with
  the engine's own check (:func:`check_selection`); :func:`make_options` builds a plugin's
  options from a policy table, as a policy does.
* :class:`FakeProc` builds a fake ``/proc`` tree (earlyoom's ``mockProc`` idea); point a
  :class:`reapkit.lowlevel.ProcFS` at it to test selectors on any processes you like. A guard
  reading a fake tree never signals, so whole policies can run against it safely.
* :class:`SandboxCgroup` creates a cgroup (memory with a hard limit, the v1 freezer, or a plain
  v2 one) and removes it — thawing, killing its members by pidfd, child cgroups first.
* :func:`start_hog`, :func:`start_grower` and :func:`start_thrasher` run memory hogs and real
  memory pressure inside sandbox cgroups; :func:`make_thrash_file` prepares the thrasher's file.
* Whole incidents: :func:`load_trace` reads a trace (``reapkit record``), :class:`TraceBuilder`
  makes synthetic ones (a leak at a given rate, a thrashing page cache, a fork storm), and
  :func:`replay` runs a policy over either, as ``reapkit replay`` does.
"""

from ._testing._builders import check_selection as check_selection
from ._testing._builders import make_candidate as make_candidate
from ._testing._builders import make_options as make_options
from ._testing._builders import make_situation as make_situation
from ._testing._builders import read_candidates as read_candidates
from ._testing._builders import run_selector as run_selector
from ._testing._fakeproc import FakeProc as FakeProc
from ._testing._hog import Hog as Hog
from ._testing._hog import make_thrash_file as make_thrash_file
from ._testing._hog import start_grower as start_grower
from ._testing._hog import start_hog as start_hog
from ._testing._hog import start_thrasher as start_thrasher
from ._testing._sandbox import SandboxCgroup as SandboxCgroup
from ._testing._traces import TraceBuilder as TraceBuilder
from ._testing._traces import load_trace as load_trace
from ._testing._traces import replay as replay
