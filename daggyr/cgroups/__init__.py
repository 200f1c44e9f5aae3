"""The cgroup layer: one interface over cgroup v2, cgroup v1 and no cgroups.

``detect()`` picks the back-end; its manager creates one ``TaskCgroup`` per
task with the limits written before anything runs in it. The runner's root
(config ``cgroup_root``, ``root_name`` here) is either a single directory name,
created directly under the mount point of the cgroup2 mount or of each v1
hierarchy, or, on cgroup v2 only, an absolute path below the cgroup2 mount,
for a subtree delegated to daggyr. Everything the layer creates or removes
lies under that root.
"""

from daggyr.cgroups.base import AppliedLimits, CgroupError, Usage
from daggyr.cgroups.detect import detect
from daggyr.cgroups.fs import CgroupFs
from daggyr.cgroups.manager import CgroupManager
from daggyr.cgroups.none import NoneCgroupManager
from daggyr.cgroups.task import TaskCgroup
from daggyr.cgroups.v1 import V1CgroupManager, V1TaskCgroup
from daggyr.cgroups.v2 import V2CgroupManager, V2TaskCgroup

__all__ = [
    "AppliedLimits",
    "CgroupError",
    "CgroupFs",
    "CgroupManager",
    "NoneCgroupManager",
    "TaskCgroup",
    "Usage",
    "V1CgroupManager",
    "V1TaskCgroup",
    "V2CgroupManager",
    "V2TaskCgroup",
    "detect",
]
