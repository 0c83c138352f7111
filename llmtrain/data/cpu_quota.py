"""How many CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota.

A Kubernetes pod with a CPU limit but no cpuset sees every CPU of the host in its affinity
(224 on a large node) while the kernel lets it run only `limit` CPUs' worth: starting 28 tokenizer
processes per rank there just thrashes (and costs ~250 MB each). The quota is cgroup v2's
`cpu.max` ("QUOTA PERIOD" or "max PERIOD") or v1's cpu.cfs_quota_us / cpu.cfs_period_us, the
tightest one on the path from this process's cgroup to the root.
"""
from __future__ import annotations

import math
import os
from typing import Optional

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_CGROUP = "/proc/self/cgroup"


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _ancestors(root: str, rel: str) -> list[str]:
    """root/rel, root/parent-of-rel, ..., root (the namespace's own root is what a container sees)."""
    parts = [p for p in rel.strip("/").split("/") if p]
    return [os.path.join(root, *parts[:k]) for k in range(len(parts), -1, -1)]


def cgroup_cpu_limit(root: Optional[str] = None, proc_cgroup: Optional[str] = None) -> Optional[float]:
    """The CPU quota in CPUs (e.g. 8.0, 0.5), or None when there is none (or no cgroup fs)."""
    root, proc_cgroup = root or CGROUP_ROOT, proc_cgroup or PROC_CGROUP
    v2_rel, v1_rel = "/", "/"
    for line in (_read(proc_cgroup) or "").splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if hier == "0" and controllers == "":
            v2_rel = rel
        elif "cpu" in controllers.split(","):
            v1_rel = rel
    limits = []
    for d in _ancestors(root, v2_rel):
        quota, _, period = (_read(os.path.join(d, "cpu.max")) or "").partition(" ")
        if quota and quota != "max" and period:
            limits.append(int(quota) / int(period))
    for v1 in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        for d in _ancestors(os.path.join(root, v1), v1_rel):
            quota, period = _read(os.path.join(d, "cpu.cfs_quota_us")), _read(os.path.join(d, "cpu.cfs_period_us"))
            if quota and period and int(quota) > 0 and int(period) > 0:
                limits.append(int(quota) / int(period))
    return min(limits) if limits else None


def usable_cpus(root: Optional[str] = None, proc_cgroup: Optional[str] = None) -> tuple[int, bool]:
    """(CPUs this process may use, whether it is bound to a CPU subset of its own, e.g. by Slurm)."""
    total = os.cpu_count() or 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
    bound = cpus < total
    limit = cgroup_cpu_limit(root, proc_cgroup)
    if limit is not None:
        cpus = min(cpus, max(1, math.floor(limit)))
    return cpus, bound
