"""Many workers on one study: throughput, crash recovery time, and what bad input prints.

    python benchmarks/workers.py [--postgres URL] [--trials 6] [--out benchmarks/workers.md]

Runs real ``python -m pipeline.tune`` workers on the quickstart study with a tiny per-trial budget
(one epoch per stage) against SQLite and PostgreSQL (``--postgres`` or COLT_TEST_POSTGRES_URL; to
start one: ``source .ci/postgres.sh; start_postgres``), with 1 and 3 workers; kills a worker with
SIGKILL after its first stage checkpoint and times the heartbeat's failing of its trial and the
start of the retry; feeds the CLI the bad study files and storage URLs of tests/test_bad_input.py
and records the one error line each produces. Writes a markdown report. Takes ~5-10 minutes on
2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import io
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "studies" / "quickstart.toml"
BUDGET = [
    "--set", "trial.epochs_per_stage=1",
    "--set", "certify_val.n_inputs=100",
    "--set", "study.heartbeat_interval_s=2",
    "--set", "study.grace_period_s=6",
]
HEARTBEAT_S, GRACE_S = 2, 6


def worker_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


# `python -m pipeline.tune` with every public RDBStorage call timed: the time a worker spends in
# the database (waiting for locks included), printed at exit as "storage_s=<seconds>".
TIMED_WORKER = """
import atexit, functools, sys, time
import optuna
spent = [0.0]
cls = optuna.storages.RDBStorage
for name, attr in list(vars(cls).items()):
    if name.startswith("_") or not callable(attr):
        continue
    def timed(f):
        @functools.wraps(f)
        def call(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t
        return call
    setattr(cls, name, timed(attr))
atexit.register(lambda: print(f"storage_s={spent[0]:.3f}", flush=True))
from pipeline.tune import main
sys.exit(main(sys.argv[1:]))
"""


def spawn(args: list[str], cwd: Path, log: Path, timed: bool = False) -> subprocess.Popen:
    command = ["-c", TIMED_WORKER] if timed else ["-m", "pipeline.tune"]
    with log.open("w") as fh:
        return subprocess.Popen([sys.executable, *command, "--study", str(STUDY), *args],
                                cwd=cwd, env=worker_env(), stdout=fh, stderr=subprocess.STDOUT)


def load(url: str, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=url)


def throughput(url: str, workers: int, n_trials: int, work: Path) -> dict:
    name = f"bench_{workers}w_{uuid.uuid4().hex[:6]}"
    args = ["--storage", url, "--n-trials", str(n_trials), "--set", f"study.name={name}",
            *BUDGET]
    start = time.time()
    logs = [work / f"{name}_{i}.log" for i in range(workers)]
    procs = [spawn(args, work, log, timed=True) for log in logs]
    for proc, log in zip(procs, logs):
        proc.wait(timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"worker failed:\n{log.read_text()[-2000:]}")
    wall = time.time() - start
    trials = load(url, name).get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    first = min(t.datetime_start for t in trials).timestamp()
    last = max(t.datetime_complete for t in trials).timestamp()
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials]
    texts = [log.read_text() for log in logs]
    locked = sum(text.count("database is locked") for text in texts)
    storage_s = [float(line.split("=")[1]) for text in texts for line in text.splitlines()
                 if line.startswith("storage_s=")]
    finished = states.count("COMPLETE") + states.count("PRUNED")
    return {"workers": workers, "n": len(trials), "finished": finished,
            "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
            "other": len(trials) - finished, "wall_s": wall, "busy_s": last - first,
            "per_hour_wall": 3600 * finished / wall,
            "per_hour_busy": 3600 * finished / (last - first),
            "median_trial_s": statistics.median(durations), "locked": locked,
            "storage_s": max(storage_s) if storage_s else float("nan"),
            "device": trials[0].user_attrs.get("env", {}).get("device", "?")}


def crash(url: str, work: Path) -> dict:
    """Kill the only worker after trial 0's first stage checkpoint; restart it at once."""
    name = f"crash_{uuid.uuid4().hex[:6]}"
    args = ["--storage", url, "--n-trials", "1", "--set", f"study.name={name}",
            "--set", "study.pruner=none", *BUDGET, "--set", "trial.epochs_per_stage=2"]
    stage0 = work / "runs" / name / "trial_0" / "stage0.pt"
    first = spawn(args, work, work / f"{name}_a.log")
    last = stage0.with_name("last.pt")
    # The trainer writes stage0.pt, then last.pt: kill once both hold the end of stage 0.
    while not (stage0.exists() and last.exists()
               and last.stat().st_mtime_ns >= stage0.stat().st_mtime_ns):
        if first.poll() is not None:
            raise RuntimeError((work / f"{name}_a.log").read_text()[-2000:])
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    killed = datetime.datetime.now()
    first.wait()
    mtime = stage0.stat().st_mtime_ns
    second = spawn(args, work, work / f"{name}_b.log")
    second.wait(timeout=1800)
    if second.returncode != 0:
        raise RuntimeError((work / f"{name}_b.log").read_text()[-2000:])
    trials = load(url, name).get_trials(deepcopy=False)
    dead = trials[0]
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    import json

    epochs = [json.loads(line)["global_epoch"]
              for line in (stage0.parent / "metrics.jsonl").read_text().splitlines()]
    return {"dead_state": dead.state.name, "retry_state": retry.state.name,
            "fail_after_s": (dead.datetime_complete - killed).total_seconds(),
            "retry_after_s": (retry.datetime_start - killed).total_seconds(),
            "resumed": stage0.stat().st_mtime_ns == mtime and epochs == sorted(set(epochs)),
            "epochs": epochs}


def bad_inputs(work: Path) -> tuple[list[tuple[str, str, int, str]], list[tuple[str, int, str]]]:
    spec = importlib.util.spec_from_file_location("bad", ROOT / "tests" / "test_bad_input.py")
    bad = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT))
    spec.loader.exec_module(bad)
    from pipeline.tune import main

    def run(argv: list[str]) -> tuple[int, str]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
        lines = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
        return code, " / ".join(lines)

    studies = []
    here = os.getcwd()
    os.chdir(work)
    try:
        for case, breaks, _ in bad.BAD_STUDIES:
            Path(f"{case}.toml").write_text(breaks(bad.TEXT))
            code, line = run(["--study", f"{case}.toml", "--storage", "sqlite:///bad.db"])
            created = "created" if Path("bad.db").exists() else "not created"
            studies.append((case, created, code, line))
        storages = []
        for url, _ in bad.storage_cases(work):
            start = time.monotonic()
            code, line = run(["--study", str(STUDY), "--storage", url, "--set",
                              "study.name=bad_storage"])
            took = time.monotonic() - start
            storages.append((url.replace(str(work), "<tmp>"), code,
                             f"{line.replace(str(work), '<tmp>')} ({took:.1f} s)"))
        checkpoints = checkpoint_cases(bad, work)
    finally:
        os.chdir(here)
    return studies, storages, checkpoints


def checkpoint_cases(bad, work: Path) -> list[tuple[str, str]]:
    """What loading damaged or hostile checkpoints and certifying non-finite input gives."""
    import pickle

    import torch

    from pipeline.checkpoint import CheckpointError, save_checkpoint
    from pipeline.config import CertifyConfig, to_dict
    from pipeline.evaluate import zonotope_certified
    from pipeline.train import load_trained_net, make_net

    cfg = bad.tiny_cfg()
    good = work / "good.pt"
    save_checkpoint({"config": to_dict(cfg), "model": make_net(cfg).state_dict()}, good)
    data = good.read_bytes()
    marker = work / "pwned"
    files = {
        "truncated.pt": data[: len(data) // 2],
        "garbage.pt": os.urandom(len(data)),
        "empty.pt": b"",
        "evil_pickle.pt": pickle.dumps(bad.Evil(f"touch {marker}")),
    }
    torch.save(bad.Evil(f"touch {marker}"), work / "evil_torch.pt")
    torch.save({"state_dict": {}}, work / "foreign.pt")
    rows = []
    for name, content in files.items():
        (work / name).write_bytes(content)
    for name in [*files, "evil_torch.pt", "foreign.pt", "missing.pt"]:
        try:
            load_trained_net(work / name)
            rows.append((name, "loaded (!)"))
        except CheckpointError as err:
            rows.append((name, f"CheckpointError: {str(err).replace(str(work), '<tmp>')}"))
    rows.append(("os.system payloads run?", "yes (!)" if marker.exists() else "no"))
    net, x, y, eps = bad.certifiable_setup()
    x_nan = x.clone()
    x_nan[0, 0, 0, 0] = float("nan")
    rows.append(("zonotope_certified, clean / NaN pixel in input 0",
                 f"{zonotope_certified(net, x, y, eps).tolist()} / "
                 f"{zonotope_certified(net, x_nan, y, eps).tolist()}"))
    try:
        from pipeline.certify.cascade import Certifier
    except ImportError:
        return rows
    ccfg = CertifyConfig(pgd_restarts=1, pgd_steps=5, slope_iters=5, milp=False)
    res = Certifier(net, ccfg).certify(x_nan[0], int(y[0]), eps)
    rows.append(("cascade, NaN pixel", f"status={res.status} method={res.method}"))
    with torch.no_grad():
        next(p for n, p in net.named_parameters() if "weight" in n)[0, 0] = float("nan")
    res = Certifier(net, ccfg).certify(x[0], int(y[0]), eps)
    rows.append(("cascade, NaN weight", f"status={res.status} method={res.method}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", default=os.environ.get("COLT_TEST_POSTGRES_URL"))
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "workers.md"))
    parser.add_argument("--no-bad-input", action="store_true", help="skip the bad-input tables")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="colt-workers-"))
    backends = {"SQLite": f"sqlite:///{work / 'optuna.db'}"}
    if args.postgres:
        backends["PostgreSQL"] = args.postgres
    started = time.time()
    load_before = os.getloadavg()
    rows, crashes = [], []
    for backend, url in backends.items():
        for workers in (1, 3):
            result = throughput(url, workers, args.trials, work)
            rows.append((backend, result))
            print(backend, result, flush=True)
        for _ in range(2):
            result = crash(url, work)
            crashes.append((backend, result))
            print(backend, "crash", result, flush=True)
    studies, storages, checkpoints = ([], [], []) if args.no_bad_input else bad_inputs(work)
    load_after = os.getloadavg()
    elapsed = time.time() - started

    import optuna
    import sqlalchemy
    import torch

    out = [
        "# Many workers: throughput, crash recovery, bad input",
        "",
        f"Generated by `python benchmarks/workers.py` on {datetime.date.today()} "
        f"({elapsed / 60:.1f} min). Machine: {os.cpu_count()} CPU cores "
        f"({platform.machine()}), torch {torch.__version__} (CPU, `OMP_NUM_THREADS=1` per "
        f"worker), optuna {optuna.__version__}, SQLAlchemy {sqlalchemy.__version__}, "
        "PostgreSQL 15 on 127.0.0.1. Load average before/after: "
        f"{load_before[0]:.1f} / {load_after[0]:.1f} (other jobs shared the machine: read the "
        "numbers as indicative).",
        "",
        "## Trials per hour",
        "",
        f"Quickstart study (digits, ConvMed 1-1-32, 3 stages), tiny trial budget: "
        f"`{' '.join(BUDGET[1::2][:2])}`; {args.trials} trials per study, all workers started "
        "together. *Wall* counts from starting the workers to the last one exiting (start-up "
        "included); *busy* from the first trial's start to the last trial's end.",
        "",
        "| storage | device | workers | finished (complete + pruned) | other states | wall s | "
        "trials/h (wall) | trials/h (busy) | median trial s | in database s (most of a worker) "
        "| 'database is locked' |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for backend, r in rows:
        out.append(f"| {backend} | {r['device']} | {r['workers']} | {r['finished']} "
                   f"({r['complete']} + "
                   f"{r['pruned']}) | {r['other']} | {r['wall_s']:.0f} | "
                   f"{r['per_hour_wall']:.0f} | {r['per_hour_busy']:.0f} | "
                   f"{r['median_trial_s']:.1f} | {r['storage_s']:.2f} | {r['locked']} |")
    out += [
        "",
        f"With {os.cpu_count()} cores, 3 single-threaded workers cannot be 3x faster than one: "
        "the gain is bounded by the cores (each trial also gets slower when workers share them, "
        "see the median trial time). The database is not the bottleneck: *in database* is the "
        "time the busiest worker spent in Optuna storage calls (lock waits included), a small "
        "part of its run with either storage. On a machine with one GPU per worker the trials "
        "do not compete and throughput scales with the number of workers until the database "
        "is the bottleneck, which at a few trials per minute it is not.",
        "",
        "## Worker death to retry",
        "",
        f"One worker, `--n-trials 1`, heartbeat every {HEARTBEAT_S} s, grace period {GRACE_S} s; "
        "SIGKILL right after `trial_0/stage0.pt` and `last.pt` hold the end of stage 0, the "
        "same command started again at once. The restarted worker finds the cap taken by the "
        "dead RUNNING trial, waits, and polls every heartbeat interval: the trial is failed "
        "once its heartbeat is older than the grace period and re-queued by "
        "`RetryHeartbeatStaleTrialCallback`; the worker takes the retry, which resumes in "
        "`trial_0/` from `last.pt`.",
        "",
        "| storage | killed trial | retry | kill → marked FAIL s | kill → retry started s | "
        "resumed (stage0.pt untouched, no epoch twice) |",
        "|---|---|---|---|---|---|",
    ]
    for backend, c in crashes:
        out.append(f"| {backend} | {c['dead_state']} | {c['retry_state']} | "
                   f"{c['fail_after_s']:.1f} | {c['retry_after_s']:.1f} | "
                   f"{'yes' if c['resumed'] else 'NO'} {c['epochs']} |")
    out += [
        "",
        f"Bound: a dead worker's trial is failed at most grace + heartbeat interval "
        f"(= {GRACE_S + HEARTBEAT_S} s here; 30 + 10 s with the quickstart's settings) after "
        "its last heartbeat, by whichever worker next starts a trial or waits at the cap; the "
        "retry starts when a worker is free (at once for a waiting one, else after the trial it "
        "is running).",
        "",
        "## Bad input",
        "",
        "`python -m pipeline.tune --study CASE.toml --storage sqlite:///bad.db`: each is one "
        "line on stderr and exit status 2; the database file is never created. CASE.toml is "
        "the quickstart study broken as named (see `tests/test_bad_input.py`).",
        "",
        "| case | exit | bad.db | stderr |",
        "|---|---|---|---|",
    ]
    for case, created, code, line in studies:
        out.append(f"| {case} | {code} | {created} | `{line}` |")
    out += [
        "",
        "`python -m pipeline.tune --storage URL` (valid study):",
        "",
        "| URL | exit | stderr (time to fail) |",
        "|---|---|---|",
    ]
    for url, code, line in storages:
        out.append(f"| `{url}` | {code} | `{line}` |")
    out += [
        "",
        "Checkpoints (`pipeline.train.load_trained_net`) and non-finite input or weights:",
        "",
        "| case | result |",
        "|---|---|",
    ]
    for case, line in checkpoints:
        out.append(f"| {case} | `{line}` |")
    Path(args.out).write_text("\n".join(out) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
