"""reapkit: a trio framework for user-space out-of-memory reapers on Linux.

Public names only; the code lives in private modules (trio's style). Kernel-level pieces are
in :mod:`reapkit.lowlevel`.
"""

from ._errors import AccessDenied as AccessDenied
from ._errors import InvalidValue as InvalidValue
from ._errors import NoSuchProcess as NoSuchProcess
from ._errors import NotDying as NotDying
from ._errors import ProcessChanged as ProcessChanged
from ._errors import ProcFormatError as ProcFormatError
from ._errors import ReapkitError as ReapkitError
from ._errors import Unsupported as Unsupported
from ._guard import CgroupScope as CgroupScope
from ._guard import KillGuard as KillGuard
from ._guard import KillRefused as KillRefused
from ._guard import Refusal as Refusal
from ._guard import RefusalReason as RefusalReason
from ._guard import Scope as Scope
from ._guard import SignalOutcome as SignalOutcome
from ._guard import SubtreeScope as SubtreeScope
from ._guard import SystemScope as SystemScope
from ._process import ProcessRef as ProcessRef
from ._version import __version__ as __version__
