"""Helpers for testing policies and plugins: fake ``/proc`` trees, sandbox cgroups, hogs.

* :class:`FakeProc` builds a fake ``/proc`` tree (earlyoom's ``mockProc`` idea); point a
  :class:`reapkit.lowlevel.ProcFS` at it to test selectors on any processes you like. A guard
  reading a fake tree never signals, so whole policies can run against it safely.
* :class:`SandboxCgroup` creates a cgroup (memory with a hard limit, the v1 freezer, or a plain
  v2 one) and removes it — thawing, killing its members by pidfd, child cgroups first.
* :func:`start_hog`, :func:`start_grower` and :func:`start_thrasher` run memory hogs and real
  memory pressure inside sandbox cgroups; :func:`make_thrash_file` prepares the thrasher's file.
"""

from ._fakeproc import FakeProc as FakeProc
from ._hog import Hog as Hog
from ._hog import make_thrash_file as make_thrash_file
from ._hog import start_grower as start_grower
from ._hog import start_hog as start_hog
from ._hog import start_thrasher as start_thrasher
from ._sandbox import SandboxCgroup as SandboxCgroup
