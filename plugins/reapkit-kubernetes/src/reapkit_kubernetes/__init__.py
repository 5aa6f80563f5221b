"""reapkit-kubernetes: a reapkit selector that knows Kubernetes pod QoS classes.

``kubernetes-qos`` (:class:`KubernetesQos`) chooses BestEffort pods first, then Burstable,
never Guaranteed, and protects processes outside pods, reading each candidate's QoS class, pod
UID and container from its cgroup path (:func:`parse_cgroup_path`), for both kubelet cgroup
drivers (cgroupfs and systemd), cgroup v1 and v2, and the containerd, CRI-O and Docker
runtimes. It registers through the ``reapkit.plugins`` entry point group.

Public names only; the code lives in private modules.
"""

from ._paths import QOS_CLASSES as QOS_CLASSES
from ._paths import Driver as Driver
from ._paths import PodInfo as PodInfo
from ._paths import QosClass as QosClass
from ._paths import Runtime as Runtime
from ._paths import parse_cgroup_path as parse_cgroup_path
from ._paths import qos_display_name as qos_display_name
from ._selector import KubernetesQos as KubernetesQos
from ._selector import KubernetesQosOptions as KubernetesQosOptions
from ._version import __version__ as __version__
