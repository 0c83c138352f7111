"""Ranks and worlds: launcher discovery (launchers.py), rendezvous and teardown (rendezvous.py), rank-0
helpers and small collectives (ranks.py), one rank's long file work while the others wait
(waiting.py), and the start-of-run consistency checks (preflight.py).

The library reads it as one namespace: `from llmtrain import distributed as dist; dist.print0(...)`.
Modules inside this package import their siblings directly, never this facade.
"""
from .launchers import DistInfo, LaunchError, discover_env, fail, set_cpu_threads
from .ranks import (all_gather_object, all_reduce_sum, barrier, broadcast_object, host_name, is_main, launcher_rank,
                    print0, rank, warn, world_size)
from .rendezvous import finish, init, shutdown

__all__ = ["DistInfo", "LaunchError", "all_gather_object", "all_reduce_sum", "barrier", "broadcast_object",
           "discover_env", "fail", "finish", "host_name", "init", "is_main", "launcher_rank", "print0", "rank",
           "set_cpu_threads", "shutdown", "warn", "world_size"]
