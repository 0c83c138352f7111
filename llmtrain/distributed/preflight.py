"""Preflight: before hours are spent, check that every rank runs the same thing and the links are sound.

Runs at the start of every training run (right after dist.init) and on its own (llmtrain.cli.preflight):
    python|torchrun|deepspeed|mpirun|srun ... launch/preflight.py --recipe R [key=value ...]
    python launch/preflight.py --hostfile H        # only: can every host of a DeepSpeed hostfile be reached?

Every rank computes its identity (config hash, code version, library versions, tokenizer hash, data
manifest); one all_gather_object brings them to every rank, and a rank that differs from rank 0 is
named in a one-line error on every rank (exit status 2). An all-reduce probe reports bus bandwidth per
rank and names ranks far below the median. Rank 0 prints a table of ranks and the NCCL/gloo settings.
Cost at start-up: a tokenizer load, a stat of the data files, two small gathers and ~0.5 GB of all-reduce.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import socket
import statistics
import sys
import time
from typing import Any, Optional

import torch

from ..config import Config, DataConfig, sources, to_dict
from ..errors import ConfigError
from . import ranks as dist
from .launchers import DistInfo

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # llmtrain/: its sources are hashed
PROBE_MB = 64  # size of one all-reduce of the bandwidth probe (fp32), in MiB
PROBE_ITERS = 3  # timed all-reduces (after one untimed warm-up)
SLOW_FRACTION = 0.5  # a rank whose bus bandwidth is below this share of the median is named as slow
ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_", "GLOO_", "MASTER_", "TORCH_DISTRIBUTED_", "NVIDIA_VISIBLE", "CUDA_VISIBLE")
IDENTITY_NAMES = {  # report field -> how the error names it
    "config": "config hash",
    "code": "code version",
    "libraries": "library versions",
    "tokenizer": "tokenizer hash",
    "data": "data manifest",
}


class PreflightError(ConfigError):
    """Ranks disagree about what they run: exit status 2 with the ranks named."""


# --- identity -----------------------------------------------------------------------------------

def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def config_hash(cfg: Config) -> str:
    """Hash of the resolved config (every key: ranks must agree on all of it)."""
    return _short_hash(json.dumps(to_dict(cfg), sort_keys=True, default=str))


def _git_commit(start: str) -> Optional[str]:
    """Commit of the checkout holding `start`, read from .git without running git (fast, no subprocess)."""
    path = start
    while True:
        dot_git = os.path.join(path, ".git")
        if os.path.exists(dot_git):
            break
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    try:
        if os.path.isfile(dot_git):  # a worktree or submodule: "gitdir: <path>"
            with open(dot_git) as f:
                dot_git = os.path.join(path, f.read().split(":", 1)[1].strip())
        with open(os.path.join(dot_git, "HEAD")) as f:
            head = f.read().strip()
        if not head.startswith("ref:"):
            return head[:12]  # detached HEAD
        ref = head.split(":", 1)[1].strip()
        common = dot_git
        if os.path.exists(os.path.join(dot_git, "commondir")):
            with open(os.path.join(dot_git, "commondir")) as f:
                common = os.path.join(dot_git, f.read().strip())
        for base in (dot_git, common):
            if os.path.exists(os.path.join(base, ref)):
                with open(os.path.join(base, ref)) as f:
                    return f.read().strip()[:12]
        with open(os.path.join(common, "packed-refs")) as f:
            for line in f:
                if line.rstrip().endswith(" " + ref):
                    return line.split()[0][:12]
    except (OSError, IndexError):
        pass
    return None


def _llmtrain_version() -> str:
    try:
        from importlib.metadata import version

        return version("llmtrain")
    except Exception:  # not installed as a package (run from a checkout)
        return "unknown"


def code_version() -> str:
    """git commit (when a checkout) + package version + hash of llmtrain's own sources (catches local edits)."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(PACKAGE_DIR, "**", "*.py"), recursive=True)):
        h.update(os.path.relpath(path, PACKAGE_DIR).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    commit = _git_commit(PACKAGE_DIR) or "no-git"
    return f"{commit} llmtrain {_llmtrain_version()} src {h.hexdigest()[:12]}"


def library_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)  # metadata only: no import of the (slow to import) package
        except PackageNotFoundError:
            return "absent"

    return f"torch {torch.__version__} deepspeed {v('deepspeed')} transformers {v('transformers')}"


def _files_of(path: str) -> list[tuple[str, int]]:
    """(path, size) of every file a source path names: a file, a glob, or a directory (walked)."""
    paths = sorted(glob.glob(path, recursive=True)) if any(ch in path for ch in "*?[") else [path]
    out = []
    for p in paths:
        if os.path.isdir(p):
            for root, dirs, files in os.walk(p):
                dirs.sort()
                out += [(os.path.join(root, f), os.path.getsize(os.path.join(root, f))) for f in sorted(files)]
        elif os.path.isfile(p):
            out.append((p, os.path.getsize(p)))
    return out


def data_manifest(d: DataConfig) -> tuple[str, int, int]:
    """(hash of the train/eval source files' paths and sizes, file count, bytes). A source missing on
    one node changes the hash; mtimes are left out (copies on node-local disks differ in them)."""
    lines = []
    for key in ("data.train", "data.eval"):
        for src in sources(d, key):
            files = _files_of(src.path)
            lines += [f"{key}|{os.path.abspath(p)}|{size}" for p, size in files] or [f"{key}|{src.path}|missing"]
    total = sum(int(x.rsplit("|", 1)[1]) for x in lines if not x.endswith("|missing"))
    return _short_hash("\n".join(lines)), len(lines), total


def rank_report(cfg: Config, info: DistInfo, tokenizer_hash: str) -> dict[str, Any]:
    manifest, n_files, n_bytes = data_manifest(cfg.data)
    return {
        "rank": info.rank, "local_rank": info.local_rank, "host": dist.host_name(), "pid": os.getpid(),
        "device": _device_name(info.device),
        "config": config_hash(cfg), "code": code_version(), "libraries": library_versions(),
        "tokenizer": tokenizer_hash, "data": manifest, "data_files": n_files, "data_bytes": n_bytes,
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)},
        # coordinates in the DP x SP x TP mesh (mesh.py): which rows (dp), which slice of a row (sp), which weight shard (tp)
        "mesh": info.mesh.coordinates() if info.mesh is not None else {"dp": info.rank, "sp": 0, "tp": 0},
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index} {torch.cuda.get_device_name(device)}"
    return f"cpu ({torch.get_num_threads()} threads)"


# --- comparison ---------------------------------------------------------------------------------

def _config_diff(mine: dict, ref: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, 'key: mine vs rank 0's'."""
    out = []
    for k in sorted(set(mine) | set(ref)):
        a, b = mine.get(k), ref.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}={a!r} vs {b!r}")
    return out


def mismatches(reports: list[dict], config_dicts: Optional[list[dict]] = None) -> list[str]:
    """One phrase per (field, rank) that differs from rank 0, e.g. 'rank 1 (host x) has a different ...'."""
    ref = reports[0]
    problems = []
    for field, name in IDENTITY_NAMES.items():
        bad = [r for r in reports[1:] if r[field] != ref[field]]
        for r in bad[:8]:
            detail = f"{r[field]} vs {ref[field]}"
            if field == "config" and config_dicts is not None:
                detail = ", ".join(_config_diff(config_dicts[r["rank"]], config_dicts[0])[:5]) or detail
            problems.append(f"rank {r['rank']} (host {r['host']}) has a different {name} than rank 0: {detail}")
        if len(bad) > 8:
            problems.append(f"and {len(bad) - 8} more rank(s) with a different {name}")
    return problems


# --- bandwidth ----------------------------------------------------------------------------------

def bandwidth_probe(info: DistInfo, size_mb: int = PROBE_MB, iters: int = PROBE_ITERS) -> float:
    """This rank's all-reduce bus bandwidth in GB/s: algorithm bandwidth x 2(n-1)/n, the nccl-tests
    convention (the bytes each rank sends and receives in a ring all-reduce). 0.0 in one process."""
    import torch.distributed as tdist

    n = info.world_size
    if n == 1:
        return 0.0
    x = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32, device=info.device)
    tdist.all_reduce(x)  # warm-up: connection set-up and allocator
    _sync(info.device)
    tdist.barrier()  # start together: time the transfer, not a late neighbour
    start = time.perf_counter()
    for _ in range(iters):
        tdist.all_reduce(x)
    _sync(info.device)  # CUDA collectives are asynchronous: wait before reading the clock
    seconds = (time.perf_counter() - start) / iters
    return x.numel() * 4 / seconds * 2 * (n - 1) / n / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def slow_ranks(reports: list[dict]) -> list[str]:
    median = statistics.median(r["busbw"] for r in reports)
    return [f"rank {r['rank']} (host {r['host']}) {r['busbw']:.2f} GB/s" for r in reports
            if r["busbw"] < SLOW_FRACTION * median]


# --- report -------------------------------------------------------------------------------------

def format_table(reports: list[dict]) -> str:
    rows = [("rank", "local", "dp", "sp", "tp", "host", "device", "pid", "all-reduce GB/s")]
    rows += [(str(r["rank"]), str(r["local_rank"]), *(str(r.get("mesh", {}).get(k, "-")) for k in ("dp", "sp", "tp")),
              r["host"], r["device"], str(r["pid"]), f"{r['busbw']:.2f}" if r["busbw"] else "-") for r in reports]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def run(cfg: Config, info: DistInfo, tokenizer_hash: str) -> list[dict]:
    """Gather every rank's identity, fail naming the ranks that differ from rank 0, probe bandwidth, report.
    tokenizer_hash: models.tokenizer.tokenizer_hash of the tokenizer this rank loaded."""
    import torch.distributed as tdist

    start = time.perf_counter()
    mine = rank_report(cfg, info, tokenizer_hash)
    mine["busbw"] = bandwidth_probe(info)
    reports = [mine]
    if info.world_size > 1:
        reports = [None] * info.world_size
        tdist.all_gather_object(reports, mine)
    problems = mismatches(reports)
    if problems and any(r["config"] != reports[0]["config"] for r in reports):
        configs = [None] * info.world_size  # second gather only on a mismatch: names the differing keys
        tdist.all_gather_object(configs, to_dict(cfg))
        problems = mismatches(reports, configs)
    if problems:
        raise _fail("preflight: " + "; ".join(problems))

    ref = reports[0]
    mesh = f", {info.mesh.describe()}" if info.mesh is not None else ""
    dist.print0(f"preflight: {info.world_size} rank(s) via {info.launcher}, backend {info.backend}{mesh}\n{format_table(reports)}")
    dist.print0(f"preflight: all ranks agree: config {ref['config']}, code {ref['code']}, {ref['libraries']}, "
                f"tokenizer {ref['tokenizer']}, data {ref['data']} ({ref['data_files']} files, "
                f"{ref['data_bytes'] / 1e6:.1f} MB)")
    env = " ".join(f"{k}={v}" for k, v in ref["env"].items()) or "(none set)"
    dist.print0(f"preflight: env on rank 0: {env}")
    differ = [f"rank {r['rank']} (host {r['host']})" for r in reports[1:]
              if {k: v for k, v in r["env"].items() if k.startswith(("NCCL_", "GLOO_", "TORCH_NCCL_"))}
              != {k: v for k, v in ref["env"].items() if k.startswith(("NCCL_", "GLOO_", "TORCH_NCCL_"))}]
    if differ:
        dist.print0(f"preflight: warning: NCCL_*/GLOO_* settings differ from rank 0's on {', '.join(differ[:8])}")
    if info.world_size > 1:
        slow = slow_ranks(reports)
        median = statistics.median(r["busbw"] for r in reports)
        dist.print0(f"preflight: all-reduce {PROBE_MB} MiB fp32: median bus bandwidth {median:.2f} GB/s"
                    + (f"; slow (< {SLOW_FRACTION:.0%} of median): {', '.join(slow)}" if slow else ""))
    dist.print0(f"preflight: ok in {time.perf_counter() - start:.1f} s")
    return reports


def _fail(message: str) -> PreflightError:
    """Every rank reports the line (the command prints only rank 0's)."""
    if dist.launcher_rank() != 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    return PreflightError(message)


# --- hostfile check -----------------------------------------------------------------------------

def check_hostfile(path: str, ssh_port: int = 22, timeout_s: float = 3.0) -> list[str]:
    """Problems with a DeepSpeed hostfile ('host slots=N' lines): unresolvable or unreachable (ssh port) hosts.

    The deepspeed launcher itself only says that pdsh/ssh failed, after the fact; this names the hosts."""
    problems = []
    with open(path) as f:
        hosts = [line.split()[0] for line in f if line.split() and not line.lstrip().startswith("#")]
    if not hosts:
        return [f"{path}: no hosts (expected lines like 'node01 slots=8')"]
    for host in hosts:
        try:
            addr = socket.getaddrinfo(host, ssh_port, type=socket.SOCK_STREAM)[0][4]
        except OSError as e:
            problems.append(f"{host}: does not resolve ({e.strerror or e})")
            continue
        try:
            with socket.create_connection(addr[:2], timeout=timeout_s):
                pass
        except OSError as e:
            problems.append(f"{host} ({addr[0]}): ssh port {ssh_port} not reachable within {timeout_s:g} s ({e.strerror or e})")
    return problems
