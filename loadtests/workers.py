"""Find the processes of a local Ray node and sample their memory (RSS, and USS where readable).

Why psutil and process titles: Ray's state API needs the dashboard's API server, which the local
stacks do not run, while every Ray worker renames itself ``ray::<Class>`` (``ray::ServeController``,
``ray::ProxyActor``, ``ray::ServeReplica:<app>:<deployment>``, ``ray::IDLE``); raylet and gcs_server
are plain executables. Each process is one series keyed by label and pid, so a restarted replica
shows up as a series that ends and a new one that starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

RAY_BINARIES = ("raylet", "gcs_server")


@dataclass(frozen=True)
class MemorySample:
    t: float  # seconds from the start of the load
    key: str
    label: str
    pid: int
    rss_mb: float
    uss_mb: float | None


def process_label(cmdline: list[str], name: str) -> str:
    """A readable, stable label: ``ServeReplica:img2img:Ingress``, ``ServeController``, ``raylet``,
    ``monitor.py``. A busy worker's title may carry the method it runs (``ray::Class.method``): dropped,
    so the label does not depend on the moment."""
    title = cmdline[0].strip() if cmdline else ""
    if title.startswith("ray::"):
        words = title[len("ray::") :].split()
        label = words[0] if words else "worker"
        head, _, tail = label.rpartition(".")
        return head if head and tail.isidentifier() else label
    scripts = [os.path.basename(arg) for arg in cmdline[1:] if arg.endswith(".py")]
    if scripts:
        return scripts[0]
    return os.path.basename(cmdline[0]) if cmdline else name


def local_ray_roots() -> list[int]:
    """Processes that started a Ray node on this machine: each raylet's parent (the driver of an
    in-process ``ray.init``, or ``ray start``'s launcher), or the raylet itself when it was orphaned."""
    roots = set()
    for proc in psutil.process_iter(["name", "ppid"]):
        if proc.info["name"] == "raylet":
            parent = proc.info["ppid"]
            roots.add(parent if parent and parent > 1 else proc.pid)
    return sorted(roots)


class WorkerSampler:
    """Samples ``roots`` and all their descendants but ``ignore``; ``driver_pid`` (the process that
    hosts the Ray driver, e.g. the service the soak started) is labelled ``driver``."""

    def __init__(self, roots: list[int], driver_pid: int | None = None, ignore: tuple[int, ...] = ()) -> None:
        self.roots = roots
        self.driver_pid = driver_pid
        self.ignore = set(ignore)  # e.g. the S3 server: test infrastructure, not the service
        self._labels: dict[int, str] = {}

    def processes(self) -> list[psutil.Process]:
        found: dict[int, psutil.Process] = {}
        for pid in self.roots:
            try:
                root = psutil.Process(pid)
                found[pid] = root
                found.update((child.pid, child) for child in root.children(recursive=True))
            except psutil.Error:
                continue
        return [proc for pid, proc in found.items() if pid not in self.ignore]

    def _label(self, proc: psutil.Process) -> str:
        if proc.pid == self.driver_pid:
            return "driver"
        label = process_label(proc.cmdline(), proc.name())
        if label.startswith("IDLE"):
            return label  # an idle worker may become an actor: look again next time
        return self._labels.setdefault(proc.pid, label)

    def sample(self, t: float) -> list[MemorySample]:
        """One reading of every live process; a process that exits meanwhile is skipped."""
        samples = []
        for proc in self.processes():
            try:
                label = self._label(proc)
                try:
                    info = proc.memory_full_info()
                    rss, uss = info.rss, info.uss
                except psutil.AccessDenied:
                    rss, uss = proc.memory_info().rss, None
            except psutil.Error:
                continue
            samples.append(
                MemorySample(
                    t=t,
                    key=f"{label} [{proc.pid}]",
                    label=label,
                    pid=proc.pid,
                    rss_mb=rss / 2**20,
                    uss_mb=None if uss is None else uss / 2**20,
                )
            )
        return samples
