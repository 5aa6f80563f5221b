"""The kernel layer, for advanced users: system calls, cgroups, the probe, process identity.

Everything here is a thin, typed wrapper. The reaper itself goes through
:class:`reapkit.KillGuard`; code that signals through these functions directly takes on the
guard's job.
"""

from ._engine import Engine as Engine
from ._engine import Rule as Rule
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
from ._reap_stage import ReapResult as ReapResult
from ._reap_stage import ReapSettings as ReapSettings
from ._reap_stage import ReapStage as ReapStage
from ._recorder import Recorder as Recorder
from ._recorder import RecorderStatistics as RecorderStatistics
from ._replay import ReplayedDecision as ReplayedDecision
from ._replay import ReplayResult as ReplayResult
from ._replay import replay_trace as replay_trace
from ._sources.memory import MemoryEvent as MemoryEvent
from ._sources.memory import MemoryThreshold as MemoryThreshold
from ._sources.memory import MemoryThresholdSource as MemoryThresholdSource
from ._sources.pidfd import wait_exit as wait_exit
from ._sources.proc_connector import ProcComm as ProcComm
from ._sources.proc_connector import ProcConnectorSource as ProcConnectorSource
from ._sources.proc_connector import ProcEventsLost as ProcEventsLost
from ._sources.proc_connector import ProcExec as ProcExec
from ._sources.proc_connector import ProcExit as ProcExit
from ._sources.proc_connector import ProcFork as ProcFork
from ._sources.psi import PressureEvent as PressureEvent
from ._sources.psi import PressureSnapshot as PressureSnapshot
from ._sources.psi import PressureWatchEnded as PressureWatchEnded
from ._sources.psi import PsiTriggerSource as PsiTriggerSource
from ._sources.psi import parse_pressure as parse_pressure
from ._table import ProcessTable as ProcessTable
from ._trace import Trace as Trace
from ._trace import TraceError as TraceError
from ._trace import TraceWriter as TraceWriter
from ._trace import read_trace as read_trace
from ._units import PsiSpec as PsiSpec
from ._units import parse_duration as parse_duration
from ._units import parse_psi as parse_psi
from ._units import parse_size as parse_size
