"""The kernel layer, for advanced users: system calls, cgroups, the probe, process identity.

Everything here is a thin, typed wrapper. The reaper itself goes through
:class:`reapkit.KillGuard`; code that signals through these functions directly takes on the
guard's job.
"""

from ._kernel._cgroups import CgroupMount as CgroupMount
from ._kernel._cgroups import cgroup_mounts as cgroup_mounts
from ._kernel._cgroups import mount_for as mount_for
from ._kernel._netlink import open_proc_connector as open_proc_connector
from ._kernel._netlink import proc_connector_control as proc_connector_control
from ._kernel._probe import Check as Check
from ._kernel._probe import Probe as Probe
from ._kernel._probe import effective_capabilities as effective_capabilities
from ._kernel._probe import probe as probe
from ._kernel._syscalls import MreleaseOutcome as MreleaseOutcome
from ._kernel._syscalls import cgroup_kill as cgroup_kill
from ._kernel._syscalls import mlockall as mlockall
from ._kernel._syscalls import munlockall as munlockall
from ._kernel._syscalls import pidfd_open as pidfd_open
from ._kernel._syscalls import pidfd_send_signal as pidfd_send_signal
from ._kernel._syscalls import process_mrelease as process_mrelease
from ._kernel._syscalls import set_oom_score_adj as set_oom_score_adj
from ._procfs import CgroupEntry as CgroupEntry
from ._procfs import MemInfo as MemInfo
from ._procfs import ProcessInfo as ProcessInfo
from ._procfs import ProcFS as ProcFS
from ._procfs import ProcStat as ProcStat
from ._procfs import ProcStatm as ProcStatm
from ._procfs import ProcStatus as ProcStatus
