"""Control-plane throughput: tenant admissions through the governor replica vs Redis, and durable jobs.

Measured in one run, everything on loopback, each admission case for ``--duration`` seconds after a
``--warmup``; every pair is one ``admit`` then one ``release`` (with usage figures, as a finished request
releases) under a distinct request id, for one tenant whose limits are generous enough that nothing is
refused (refusals are counted anyway):

  1. in-process ``TenantGovernor`` (``LocalAdmission``): the bare bookkeeping, no hop;
  2. today's path: one Ray Serve ``GovernorDeployment`` replica called through ``governor_client`` from
     the driver, with 8 and 64 concurrent callers (Ray in-process, 2 CPUs);
  3. ``RedisLimits`` (one Lua script per admission, one MULTI per release) from one process, 1 and 64
     concurrent callers;
  4. ``RedisLimits`` from 2 and 4 processes ("ingress replicas", multiprocessing spawn), 64 callers
     each, measured over one shared window and summed.

Each row gives pairs/s, its ratio to case (2) at 64 callers, the pair latency, and CPU time per pair
on both sides: the callers' processes (``time.process_time``, every thread: the ingress's share) and the
server's (the governor replica's process or redis-server's, from psutil), plus for Redis the time inside
its top-level commands (``INFO commandstats``). 1e6 / CPU µs per pair is what one dedicated core would
sustain: on a shared machine that figure is steadier than pairs/s, which depend on the cores obtained.

Then durable jobs: ``JobRunner`` accept → completed with an instant fake backend (tests' ``FakeBackend``)
and a ``LocalObjectStore``: one runner with ``LocalLeases`` (the single coordinator) vs ``RedisLeases``
with 1 and 2 runners in this process sharing the store and Redis; ``--jobs`` jobs submitted by
``--submitters`` concurrent callers, split across the runners, timed until every record is completed.
Both runners of the 2-runner case share one event loop: it measures what sharing leases and the store
costs, not a scale-out (that needs a process, and a core, per coordinator).

Absolute figures are this (shared) machine's; compare the rows of one run. redis-server is started and
stopped by the script (``tests/support/redis_server.py``).

    .venv/bin/python benchmarks/control_plane.py [--duration 5] [--jobs 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from serve.errors import RateLimitedError  # noqa: E402
from serve.tenancy.governor import Limits  # noqa: E402

TENANT = "bench-tenant"
LIMITS = Limits(images_per_minute=1e12, concurrency=1_000_000)  # never binding: every pair is admitted
USAGE = {"requests": 1.0, "images": 1.0, "steps": 20.0, "compute_seconds": 0.05}  # what a release carries
BASELINE = "governor replica"  # the ratio column divides by this case at its largest caller count


@dataclass
class Drive:
    """What ``callers`` concurrent loops of admit+release did in ``elapsed_s``."""

    pairs: int = 0
    refused: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    cpu_s: float = 0.0  # this process's CPU time (every thread) while it drove
    latencies_s: list[float] = field(default_factory=list, repr=False)

    def add(self, other: Drive) -> None:
        self.pairs += other.pairs
        self.refused += other.refused
        self.errors += other.errors
        self.cpu_s += other.cpu_s
        self.elapsed_s = max(self.elapsed_s, other.elapsed_s)  # the processes share one window
        self.latencies_s += other.latencies_s


async def drive(admission: Any, callers: int, duration_s: float, tag: str) -> Drive:
    """``callers`` loops, each admitting then releasing a new request id until ``duration_s`` is up."""
    result, started, cpu = Drive(), time.perf_counter(), time.process_time()
    deadline = started + duration_s

    async def caller(index: int) -> None:
        sequence = 0
        while time.perf_counter() < deadline:
            sequence += 1
            request_id = f"{tag}-{index}-{sequence}"
            begun = time.perf_counter()
            try:
                await admission.admit(TENANT, request_id, 1, LIMITS)
            except RateLimitedError:
                result.refused += 1
                continue
            except Exception:
                result.errors += 1
                await asyncio.sleep(0.01)
                continue
            try:
                await admission.release(TENANT, request_id, USAGE)
            except Exception:
                result.errors += 1
                continue
            result.latencies_s.append(time.perf_counter() - begun)
            result.pairs += 1
            if sequence % 64 == 0:  # an in-process admission never suspends: let the other callers in
                await asyncio.sleep(0)

    await asyncio.gather(*(caller(i) for i in range(callers)))
    result.elapsed_s = time.perf_counter() - started
    result.cpu_s = time.process_time() - cpu
    return result


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def row(case: str, processes: int, callers: int, result: Drive, **extra: Any) -> dict:
    """One table row; the rate is over the measured window including its tail (pairs in flight at the
    deadline finish and count)."""
    return {
        "case": case,
        "processes": processes,
        "callers": callers,
        "pairs": result.pairs,
        "pairs_per_s": result.pairs / result.elapsed_s,
        "p50_ms": _ms(percentile(result.latencies_s, 50)),
        "p99_ms": _ms(percentile(result.latencies_s, 99)),
        "refused": result.refused,
        "errors": result.errors,
        "caller_cpu_us_per_pair": result.cpu_s * 1e6 / result.pairs if result.pairs else None,
        **extra,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


# ---- the server side's accounting ------------------------------------------------------------------


class ServerAccount:
    """CPU time of the server process (the governor replica, redis-server) between ``start`` and
    ``stop``; for Redis also the time spent inside its top-level commands (``INFO commandstats``)."""

    def __init__(self, pid: int, redis_url: str | None = None) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.redis = None
        if redis_url is not None:
            import redis

            self.redis = redis.Redis.from_url(redis_url)
        self._cpu0 = 0.0

    def _cpu(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system

    def start(self) -> None:
        if self.redis is not None:
            self.redis.config_resetstat()
        self._cpu0 = self._cpu()

    def stop(self, pairs: int, duration_s: float) -> dict[str, float | None]:
        cpu_s = self._cpu() - self._cpu0
        figures = {
            "server_cpu_us_per_pair": cpu_s * 1e6 / pairs if pairs else None,
            "server_busy_cores": cpu_s / duration_s,
        }
        if self.redis is not None:
            stats = self.redis.info("commandstats")
            # Top level only: a script's and a MULTI's inner commands are counted in EVALSHA's / EXEC's.
            usec = sum(stats.get(f"cmdstat_{c}", {}).get("usec", 0) for c in ("evalsha", "multi", "exec"))
            figures["redis_cmd_us_per_pair"] = usec / pairs if pairs else None
        return figures


def _replica_pid(marker: str) -> int:
    """The process whose title names ``marker`` (Ray titles a replica ``ray::ServeReplica:app:name``)."""
    import psutil

    for process in psutil.process_iter(["pid", "cmdline"]):
        if any(marker in part for part in process.info["cmdline"] or ()):
            return process.info["pid"]
    raise RuntimeError(f"no process titled {marker!r}")


# ---- the admission cases ---------------------------------------------------------------------------


async def _local_case(args: argparse.Namespace) -> Drive:
    from serve.tenancy.governor import LocalAdmission, TenantGovernor

    admission = LocalAdmission(TenantGovernor())
    await drive(admission, args.callers, args.warmup, "local-warm")
    return await drive(admission, args.callers, args.duration, "local")


def governor_cases(args: argparse.Namespace, workdir: Path) -> list[tuple[int, Drive, dict]]:
    """Case (2): a real Serve ``GovernorDeployment`` replica through ``governor_client``."""
    import ray
    from ray import serve

    from serve.config import AppArgs
    from serve.deployments.governor import GovernorDeployment
    from serve.deployments.handles import governor_client

    os.environ.setdefault("IMG2IMG_URL_SIGNING_KEY", "control-plane-bench-signing-key")  # the replica's store
    app_args = AppArgs.model_validate(
        {
            "models": [{"spec": {"id": "sd-bench", "family": "sd", "source": "org/sd"}}],
            "storage": {"kind": "local", "local_root": str(workdir / "governor-store")},
        }
    )
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    results = []
    try:
        deployment = serve.deployment(GovernorDeployment).options(
            name="TenantGovernor",
            num_replicas=1,
            max_ongoing_requests=1000,
            ray_actor_options={"num_cpus": 0.1},  # as serve/app.py deploys it
        )
        handle = serve.run(deployment.bind(app_args), name="control-plane-bench", route_prefix=None)
        client = governor_client(handle)
        account = ServerAccount(_replica_pid("ServeReplica:control-plane-bench:TenantGovernor"))

        async def measure(callers: int) -> tuple[Drive, dict]:
            await drive(client, callers, args.warmup, f"gov-warm-{callers}")
            account.start()
            result = await drive(client, callers, args.duration, f"gov-{callers}")
            return result, account.stop(result.pairs, result.elapsed_s)

        for callers in args.governor_callers:
            results.append((callers, *asyncio.run(measure(callers))))
            print(
                f"[governor x{callers}] {results[-1][1].pairs / results[-1][1].elapsed_s:.0f} pairs/s",
                flush=True,
            )
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


async def _redis_case(url: str, callers: int, args: argparse.Namespace, account: ServerAccount) -> tuple:
    from serve.tenancy.redis_limits import RedisLimits

    limits = RedisLimits.from_url(url, None)
    try:
        await drive(limits, callers, args.warmup, f"r1-warm-{callers}")
        account.start()
        result = await drive(limits, callers, args.duration, f"r1-{callers}")
        return result, account.stop(result.pairs, result.elapsed_s)
    finally:
        await limits.client.aclose()


def _redis_worker(
    url: str, index: int, callers: int, warmup_s: float, duration_s: float, barrier, out
) -> None:
    """One "ingress replica" process: warm up, wait for the others, then measure one shared window.

    Each in a session of its own, as separate replicas are: Linux's autogroup scheduler shares a busy
    machine's cores per session, so processes left in the benchmark's session would split one share."""
    os.setsid()
    logging.basicConfig(level=logging.WARNING)

    async def main() -> Drive:
        from serve.tenancy.redis_limits import RedisLimits

        limits = RedisLimits.from_url(url, None)
        try:
            await drive(limits, callers, warmup_s, f"p{index}-warm")
            await asyncio.to_thread(barrier.wait)
            return await drive(limits, callers, duration_s, f"p{index}")
        finally:
            await limits.client.aclose()

    try:
        out.put((index, asdict(asyncio.run(main()))))
    except BaseException as error:  # the parent reports it instead of waiting forever
        out.put((index, repr(error)))
        raise


def redis_processes_case(
    url: str, processes: int, args: argparse.Namespace, account: ServerAccount
) -> tuple[Drive, dict]:
    """Case (4): ``processes`` spawned processes, ``--callers`` each, one window, summed."""
    context = multiprocessing.get_context("spawn")
    barrier, out = context.Barrier(processes + 1), context.Queue()
    workers = [
        context.Process(
            target=_redis_worker,
            args=(url, i, args.callers, args.warmup, args.duration, barrier, out),
            daemon=True,
        )
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    total = Drive()
    try:
        barrier.wait(timeout=120)  # every process has started, connected and warmed up
        account.start()
        window = time.perf_counter()
        answers = [out.get(timeout=args.duration + 120) for _ in workers]
        pairs = sum(answer["pairs"] for _, answer in answers if isinstance(answer, dict))
        stats = account.stop(pairs, time.perf_counter() - window)
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()
    for index, answer in answers:
        if not isinstance(answer, dict):
            raise RuntimeError(f"redis worker {index} failed: {answer}")
        total.add(Drive(**answer))
    return total, stats


# ---- durable jobs ----------------------------------------------------------------------------------


async def jobs_case(args: argparse.Namespace, root: Path, runners: int, redis_url: str | None) -> dict:
    """``args.jobs`` jobs accepted across ``runners`` JobRunners (one store, one Redis), until completed."""
    from serve.jobs.leases import LocalLeases, RedisLeases
    from serve.jobs.records import JobState, new_record
    from serve.jobs.runner import JobRunner
    from serve.storage.redis import connect
    from tests.unit.api_fakes import TEST_ECHO, build_app, data_url, rest_call

    apps = [build_app(root) for _ in range(runners)]  # one store folder: as coordinators share a bucket
    clients = []
    pool = []
    for app in apps:
        app.state.service.admission = None  # the coordinator alone: admissions are measured above
        if redis_url is None:
            leases = LocalLeases()
        else:
            clients.append(connect(redis_url))
            leases = RedisLeases(clients[-1], lease_s=15)
        pool.append(JobRunner(app.state.service, app.state.job_store, app.state.jobs.render, leases=leases))
    service = apps[0].state.service
    image = data_url(64, 48)
    records = []
    for i in range(args.jobs):  # prepared beforehand: the timing starts at accept
        prepared = await service.store_source(await service.prepare(rest_call(image, seed=i)))
        records.append(new_record(prepared, TEST_ECHO, None))

    gate = asyncio.Semaphore(args.submitters)
    accept_s: list[float] = []

    async def submit(i: int) -> None:
        async with gate:
            begun = time.perf_counter()
            await pool[i % runners].accept(records[i])
            accept_s.append(time.perf_counter() - begun)

    started, cpu = time.perf_counter(), time.process_time()
    deadline = started + args.jobs_timeout
    await asyncio.gather(*(submit(i) for i in range(args.jobs)))
    store = apps[0].state.job_store
    completed = 0
    while time.perf_counter() < deadline:
        await asyncio.gather(*(runner.drain() for runner in pool))
        states = [(await store.load(r.tenant, r.id)).status for r in records]
        completed = sum(state is JobState.COMPLETED for state in states)
        if all(state.terminal for state in states):
            break
        await asyncio.sleep(0.01)
    elapsed, cpu_s = time.perf_counter() - started, time.process_time() - cpu
    for client in clients:
        await client.aclose()
    runs = [len(app.state.service.backend.calls) for app in apps]
    return {
        "leases": "local" if redis_url is None else "redis",
        "runners": runners,
        "jobs": args.jobs,
        "completed": completed,
        "elapsed_s": elapsed,
        "jobs_per_s": completed / elapsed,
        "cpu_ms_per_job": cpu_s * 1000 / completed if completed else None,  # every runner, this process
        "accept_p50_ms": _ms(percentile(accept_s, 50)),
        "accept_p95_ms": _ms(percentile(accept_s, 95)),
        "runs_per_runner": runs,  # generations per runner: they sum to the job count unless one ran twice
    }


# ---- reporting -------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def admission_table(rows: list[dict], args: argparse.Namespace, load: float) -> str:
    lines = [
        f"### admit+release pairs/s ({args.duration:g} s per case after {args.warmup:g} s warm-up; "
        f"1-min load average {load:.1f} on {os.cpu_count()} CPUs)",
        "",
        f"| case | processes | callers | pairs/s | vs governor @{max(args.governor_callers)} | p50 ms "
        "| p99 ms | refused | errors | caller CPU µs/pair | server CPU µs/pair | server busy (cores) "
        "| Redis in-command µs/pair |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r.get("ratio")
        lines.append(
            f"| {r['case']} | {r['processes']} | {r['callers']} | {_fmt(r['pairs_per_s'], 0)} "
            f"| {_fmt(ratio)}{'' if ratio is None else '×'} | {_fmt(r['p50_ms'])} | {_fmt(r['p99_ms'])} "
            f"| {r['refused']} | {r['errors']} | {_fmt(r['caller_cpu_us_per_pair'], 1)} "
            f"| {_fmt(r.get('server_cpu_us_per_pair'), 1)} | {_fmt(r.get('server_busy_cores'))} "
            f"| {_fmt(r.get('redis_cmd_us_per_pair'), 1)} |"
        )
    lines += ["", "Per dedicated core, from CPU time per pair (1e6 / µs; the cores here are shared):"]
    for r in rows[1:]:
        caller, server = r["caller_cpu_us_per_pair"], r.get("server_cpu_us_per_pair")
        if caller and server:
            lines.append(
                f"* {r['case']}, {r['processes']} x {r['callers']} callers: "
                f"{1e6 / caller:,.0f} pairs/s per caller core, {1e6 / server:,.0f} per server core"
            )
    return "\n".join(lines)


def jobs_table(rows: list[dict]) -> str:
    lines = [
        "### durable jobs, accept → completed (instant fake backend, local object store)",
        "",
        "| leases | runners | jobs | completed | s | jobs/s | vs local | CPU ms/job | accept p50 ms "
        "| accept p95 ms | runs per runner |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    base = rows[0]["jobs_per_s"] if rows else None
    for r in rows:
        lines.append(
            f"| {r['leases']} | {r['runners']} | {r['jobs']} | {r['completed']} | {_fmt(r['elapsed_s'])} "
            f"| {_fmt(r['jobs_per_s'], 1)} | {_fmt(r['jobs_per_s'] / base if base else None)}× "
            f"| {_fmt(r['cpu_ms_per_job'])} "
            f"| {_fmt(r['accept_p50_ms'])} | {_fmt(r['accept_p95_ms'])} "
            f"| {', '.join(map(str, r['runs_per_runner']))} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per admission case")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before each admission case")
    parser.add_argument(
        "--callers", type=int, default=64, help="concurrent callers per process (cases 1, 3, 4)"
    )
    parser.add_argument("--governor-callers", type=int, nargs="+", default=[8, 64])
    parser.add_argument(
        "--redis-callers", type=int, nargs="+", default=[1, 64], help="case 3's caller counts"
    )
    parser.add_argument(
        "--processes", type=int, nargs="+", default=[2, 4], help="case 4's process counts (ingress replicas)"
    )
    parser.add_argument("--jobs", type=int, default=200, help="jobs per coordinator case")
    parser.add_argument("--submitters", type=int, default=16, help="concurrent accept calls")
    parser.add_argument("--jobs-timeout", type=float, default=120.0, help="bound on each coordinator case")
    parser.add_argument("--skip-governor", action="store_true", help="no Ray: cases 1, 3, 4 and jobs only")
    parser.add_argument("--skip-jobs", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.duration > 120 or args.warmup < 0 or args.warmup > 30:
        parser.error("--duration must be in (0, 120] s and --warmup in [0, 30] s")
    if args.jobs < 1 or args.jobs > 5000:
        parser.error("--jobs must be in [1, 5000]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    from tests.support.redis_server import RedisServer

    local_rows: list[dict] = []
    governor_rows: list[dict] = []
    redis_rows: list[dict] = []
    jobs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="control-plane-bench-") as tmp:
        workdir = Path(tmp)
        redis_server = RedisServer(workdir / "redis").start()
        try:
            url = redis_server.url
            account = ServerAccount(redis_server.process.pid, url)

            local = asyncio.run(_local_case(args))
            local_rows.append(row("in-process TenantGovernor", 1, args.callers, local))
            print(f"[in-process] {local.pairs / local.elapsed_s:.0f} pairs/s", flush=True)

            for callers in args.redis_callers:
                result, stats = asyncio.run(_redis_case(url, callers, args, account))
                redis_rows.append(row("Redis limiter", 1, callers, result, **stats))
                print(f"[redis 1 x{callers}] {result.pairs / result.elapsed_s:.0f} pairs/s", flush=True)
            for processes in args.processes:
                result, stats = redis_processes_case(url, processes, args, account)
                redis_rows.append(row("Redis limiter", processes, args.callers, result, **stats))
                print(f"[redis {processes} x{args.callers}] {result.pairs / result.elapsed_s:.0f} pairs/s")

            if not args.skip_jobs:
                for runners, leases in ((1, None), (1, url), (2, url)):
                    redis_server.flush()
                    root = Path(tempfile.mkdtemp(dir=workdir, prefix="jobs-"))
                    jobs.append(asyncio.run(jobs_case(args, root, runners, leases)))
                    print(f"[jobs {jobs[-1]['leases']} x{runners}] {jobs[-1]['jobs_per_s']:.1f} jobs/s")

            if not args.skip_governor:  # last: Ray's own processes would otherwise share the cores
                for callers, result, stats in governor_cases(args, workdir):
                    governor_rows.append(row(BASELINE, 1, callers, result, **stats))
        finally:
            redis_server.stop()
    load = os.getloadavg()[0]
    rows = local_rows + governor_rows + redis_rows
    if governor_rows and governor_rows[-1]["pairs_per_s"]:
        for r in rows:
            r["ratio"] = r["pairs_per_s"] / governor_rows[-1]["pairs_per_s"]
    print()
    print(admission_table(rows, args, load))
    print()
    if jobs:
        print(jobs_table(jobs))
        print()
    if args.json:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        result = {
            "config": config,
            "load_average": load,
            "cpus": os.cpu_count(),
            "admission": rows,
            "jobs": jobs,
        }
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
