"""``python -m pipeline.certify``: certify a data set slice or one VNN-LIB property.

    # a checkpoint of this project on its test set (eps from the checkpoint unless given)
    python -m pipeline.certify --model runs/x/last.pt --split test --start 0 --end 100 \\
        --out results.jsonl
    # an ONNX network exported without its normalisation (COLT's files)
    python -m pipeline.certify --model mnist_0.1.onnx --mean 0.1307 --std 0.3081 \\
        --dataset mnist --data-dir /work/shared/benchmarks/mnist --eps 0.1 --end 100
    # VNN-COMP style: prints sat / unsat / unknown / timeout, and writes the competition's
    # result file (the answer; for sat the assignment ((X_0 v) ... (Y_0 v)))
    python -m pipeline.certify --model net.onnx --vnnlib spec.vnnlib.gz --timeout-per-input 300 \
        --results out.txt

Inputs go through the cascade's cheap stages in batches (attack, zonotope, slopes); those left
open take LP and MILP in ``--workers`` processes (default: one per core). One JSON line per input (index, label, predicted, status, method, time_s, counterexample for
falsified, per-label bounds) is appended to ``--out`` with flush + fsync; inputs already in the file
are skipped, so a killed run resumes (a torn last line is dropped). ``--retry-unknown`` runs the
inputs the file holds as unknown again, as COLT's certification scripts do in later "tries" with
larger budgets (e.g. ``--timeout-per-input 300 --set lp_refine=true``); the last line of an input
counts. A summary (counts and % per
status, time per input mean / median / p95) is logged and printed at the end.

The cascade's settings come from CertifyConfig: ``--config STUDY.toml`` reads its
``[certify_test]`` table, ``--set key=value`` overrides fields. Bad input (unknown ONNX op,
unparsable VNN-LIB, shape mismatch, eps < 0, missing file) is one line on stderr and exit code 2,
before anything is written. :func:`certify_dataset` is the same run from Python (the tuning
pipeline's launch uses it).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.certify.cascade import Certifier
from pipeline.certify.spec import STATUSES, CertifyError, CertifyResult, vnn_answer
from pipeline.config import CertifyConfig, ConfigError, DataConfig, load_certify_config
from pipeline.nets import Net, NetError

log = logging.getLogger("pipeline.certify")

EXIT_BAD_INPUT = 2


class ResultsFileError(ValueError):
    """A --out file whose (non-final) lines are not this tool's JSON lines."""


# ---------------------------------------------------------------------------------------------
# Results file (JSONL, resumable)


def read_results(path: str | Path, repair: bool = True) -> dict[int, dict[str, Any]]:
    """The JSON lines of ``path`` by index. A last line without its newline (a write cut short)
    is dropped and, with ``repair``, truncated from the file; any other bad line is an error."""
    path = Path(path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    keep = len(data)
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1  # the torn tail
    results: dict[int, dict[str, Any]] = {}
    lines = data[:keep].split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            results[int(row["index"])] = row
        except (ValueError, KeyError, TypeError):
            raise ResultsFileError(f"{path}: line {number} is not a JSON result line "
                                   "(not a file written by pipeline.certify?)") from None
    if keep != len(data) and repair:
        log.warning("%s: dropping a torn last line (%d bytes)", path, len(data) - keep)
        with path.open("r+b") as fh:
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
    return results


class ResultsWriter:
    """Appends one JSON line per result, flushed and fsynced (a crash loses at most the line
    being written, which the next run drops)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self.fh = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fh = self.path.open("ab")

    def write(self, row: dict[str, Any]) -> None:
        if self.fh is None:
            return
        self.fh.write((json.dumps(row, separators=(",", ":")) + "\n").encode())
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


# ---------------------------------------------------------------------------------------------
# Summary


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and % per status, the metrics of the tuning pipeline (nat/pgd/cert accuracy) and
    the time per input (mean, median, p95), overall and per deciding stage."""
    n = len(rows)
    out: dict[str, Any] = {"n": n}
    for status in STATUSES:
        count = sum(1 for r in rows if r.get("status") == status)
        out[status] = count
        out[f"{status}_pct"] = 100.0 * count / n if n else 0.0
    out["nat_acc"] = (n - out["misclassified"]) / n if n else 0.0
    out["pgd_acc"] = (n - out["misclassified"] - out["falsified"]) / n if n else 0.0
    out["cert_acc"] = out["certified"] / n if n else 0.0
    out.update(_time_stats([float(r.get("time_s", 0.0)) for r in rows]))
    by_method: dict[str, Any] = {}
    for method in sorted({str(r.get("method")) for r in rows}):
        times = [float(r.get("time_s", 0.0)) for r in rows if str(r.get("method")) == method]
        by_method[method] = {"n": len(times), **_time_stats(times)}
    out["by_method"] = by_method
    return out


def _time_stats(times: list[float]) -> dict[str, float]:
    if not times:
        return {"time_mean_s": 0.0, "time_median_s": 0.0, "time_p95_s": 0.0}
    return {"time_mean_s": float(np.mean(times)), "time_median_s": float(statistics.median(times)),
            "time_p95_s": float(np.percentile(times, 95))}


def format_summary(summary: dict[str, Any]) -> str:
    counts = ", ".join(f"{s} {summary[s]} ({summary[f'{s}_pct']:.1f}%)" for s in STATUSES)
    return (f"{summary['n']} inputs: {counts}; time per input mean "
            f"{summary['time_mean_s']:.3f}s median {summary['time_median_s']:.3f}s p95 "
            f"{summary['time_p95_s']:.3f}s")


# ---------------------------------------------------------------------------------------------
# Python entry point


def certify_dataset(net: Net, data: Any, split: str = "test", eps: float = 0.1,
                    cfg: CertifyConfig | None = None, out: str | Path | None = None, *,
                    start: int = 0, end: int | None = None, device: str | None = None,
                    progress: bool = True, retry_unknown: bool = False,
                    workers: int = 1) -> dict[str, Any]:
    """Certify inputs ``start..end-1`` of a data set and return :func:`summarize` of them.

    ``data``: a DataConfig (its ``split`` is loaded with pipeline.data.load_split) or an indexable
    data set of (image in [0, 1], label). With ``out``, results are appended to that JSONL file
    and inputs already there are skipped (resume). ``cfg.n_inputs`` > 0 caps the count when
    ``end`` is None. ``retry_unknown``: inputs whose line says ``unknown`` are certified again
    (COLT's tries: a later try with a larger budget; its line supersedes the earlier one and
    counts its try in ``try``).

    Inputs go through the cascade's batched stages (:meth:`Certifier.certify_batch`) a chunk at
    a time; those left open take LP and MILP in this process (``workers`` 1) or in ``workers``
    spawned processes (one torch and one solver thread each). Lines are written in index order
    (completions out of order wait in memory), so a killed run resumes where its file ends.
    """
    cfg = cfg or CertifyConfig()
    if not eps >= 0:
        raise CertifyError(f"eps = {eps}: must be >= 0")
    dataset = _load_data(data, split)
    n_total = len(dataset)
    if end is None:
        end = n_total if not cfg.n_inputs else min(n_total, start + cfg.n_inputs)
    start, end = max(0, int(start)), min(int(end), n_total)
    if start > end:
        raise CertifyError(f"--start {start} is after --end {end}")
    image, _ = dataset[start] if start < n_total else (None, None)
    if image is not None and tuple(image.shape) != tuple(net.input_shape):
        raise CertifyError(f"data images have shape {tuple(image.shape)}, the network expects "
                           f"{tuple(net.input_shape)}")
    done = read_results(out) if out else {}
    _check_resumed(done, eps, out)
    if workers < 1:
        raise CertifyError(f"--workers {workers}: must be >= 1")
    certifier = Certifier(net, cfg, _device(device))
    writer = ResultsWriter(out)
    rows = {i: done[i] for i in range(start, end)
            if i in done and not (retry_unknown and done[i].get("status") == "unknown")}
    todo = [i for i in range(start, end) if i not in rows]
    bar = _progress_bar(progress, len(rows), end - start)
    ready: dict[int, CertifyResult] = {}
    position = 0  # the next index of ``todo`` to write

    def flush() -> None:
        nonlocal position
        while position < len(todo) and todo[position] in ready:
            i = todo[position]
            row = {**ready.pop(i).to_json(), "eps": eps}
            if i in done:
                row["try"] = int(done[i].get("try", 1)) + 1
            writer.write(row)
            rows[i] = row
            position += 1
            if bar is not None:
                bar.update(1)
                counts = [sum(r["status"] == s for r in rows.values()) for s in STATUSES[:3]]
                bar.set_postfix(cert=counts[0], fals=counts[1], unk=counts[2])

    pool = None  # started at the first input that needs LP/MILP
    futures: dict[int, Any] = {}
    try:
        s = 0
        while s < len(todo):
            part = todo[s: s + certifier._chunk_size()]
            s += len(part)
            images = torch.stack([torch.as_tensor(dataset[i][0]) for i in part])
            labels = torch.tensor([int(dataset[i][1]) for i in part])
            for item in certifier.certify_batch(images, labels, eps, part, finish=False):
                if isinstance(item, CertifyResult):
                    ready[item.index] = item
                elif workers > 1:
                    pool = pool or _worker_pool(net, cfg, workers)
                    futures[item.index] = pool.submit(_finish_in_worker, item.to("cpu"))
                else:
                    ready[item.index] = certifier.finish(item)
                _collect(futures, ready, wait=False)
                flush()
        while futures:
            _collect(futures, ready, wait=True)
            flush()
        flush()
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if bar is not None:
            bar.close()
        writer.close()
    summary = summarize([rows[i] for i in sorted(rows)])
    log.info("summary: %s", format_summary(summary))
    return summary


def _collect(futures: dict[int, Any], ready: dict[int, CertifyResult], wait: bool) -> None:
    """Move finished worker results into ``ready`` (with ``wait``: at least the first one)."""
    if not futures:
        return
    if wait:
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as wait_for

        wait_for(list(futures.values()), return_when=FIRST_COMPLETED)
    for i in [i for i, f in futures.items() if f.done()]:
        ready[i] = futures.pop(i).result()


# The Certifier of a worker process (built once by _init_worker).
_WORKER: dict[str, Any] = {}


def _worker_pool(net: Net, cfg: CertifyConfig, workers: int) -> Any:
    """``workers`` spawned processes for LP/MILP, one torch thread and one solver thread each
    (OMP_WAIT_POLICY=PASSIVE so that idle OpenMP threads do not spin on a shared core)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    cfg = dataclasses.replace(cfg, solver_threads=1)
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    cpu_net = copy.deepcopy(net).cpu()
    cpu_net.load_state_dict(state)
    return ProcessPoolExecutor(max_workers=workers,
                               mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(cpu_net, cfg))


def _init_worker(net: Net, cfg: CertifyConfig) -> None:
    torch.set_num_threads(1)
    _WORKER["certifier"] = Certifier(net, cfg, "cpu")


def _finish_in_worker(item: Any) -> CertifyResult:
    return _WORKER["certifier"].finish(item)


def _check_resumed(done: dict[int, dict[str, Any]], eps: float, out: Any) -> None:
    """Lines of another ε in the file would be silently mixed in: refuse them."""
    for row in done.values():
        if "eps" in row and not math.isclose(float(row["eps"]), eps, rel_tol=0, abs_tol=1e-12):
            raise ResultsFileError(f"{out}: holds results for eps {row['eps']}, not {eps} "
                                   "(use another --out)")


def certify_vnnlib(net: Net, prop: Any, cfg: CertifyConfig | None = None,
                   device: str | None = None) -> tuple[str, CertifyResult]:
    """VNN-COMP answer (sat / unsat / unknown / timeout) for a VnnlibProperty: robustness
    properties go through the cascade, others are verified disjunct by disjunct. A sat answer's
    counterexample is re-checked against the property file's own semantics by a forward pass in
    the model's precision (``result.outputs``: those outputs)."""
    cfg = cfg or CertifyConfig()
    certifier = Certifier(net, cfg, _device(device))
    label = prop.is_robustness_of()
    if label is not None:
        result = certifier.certify_box(None, prop.lower, prop.upper, label, strict=False)
    else:
        result = certifier.verify_property(prop.lower, prop.upper, prop.disjuncts)
    answer = vnn_answer(result)
    if answer == "sat":
        # The property file's own semantics must agree (the counterexample is in the box and
        # its float64 output lies in some unsafe disjunct).
        x = torch.tensor(result.counterexample, dtype=torch.float64).reshape(1, *net.input_shape)
        x_run = x.to(certifier.precision)
        with torch.no_grad():
            y = certifier.net_run(x_run.to(certifier.device)).double().cpu().numpy().reshape(-1)
        flat = x_run.double().numpy().reshape(-1)
        inside = prop.contains(flat)  # the box exactly as written
        if not (inside and np.all(np.isfinite(y)) and prop.is_violated_by(y)):
            answer = "unknown"
            result.message = "counterexample not confirmed by the property"
        else:
            result.counterexample = flat.tolist()
            result.outputs = y.tolist()
    return answer, result


def vnncomp_result(answer: str, x: list[float] | None = None,
                   y: list[float] | None = None) -> str:
    """VNN-COMP's result file: the answer line; for sat the assignment
    ``((X_0 v)`` ... ``(Y_m v))`` with values that read back to the same floats."""
    if answer != "sat" or x is None or y is None:
        return answer + "\n"
    pairs = [f"(X_{i} {float(v)!r})" for i, v in enumerate(x)] + \
        [f"(Y_{j} {float(v)!r})" for j, v in enumerate(y)]
    return "sat\n(" + "\n ".join(pairs) + ")\n"


def write_atomically(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory, fsynced and
    renamed over it: a reader sees the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ---------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints the usage too)
        raise _BadInput(f"{self.prog}: {message}")


class _BadInput(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m pipeline.certify", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="a checkpoint of this project (.pt with model+config) or an .onnx file")
    p.add_argument("--mean", help="comma list: prepend this normalisation (ONNX only)")
    p.add_argument("--std", help="comma list: prepend this normalisation (ONNX only)")
    p.add_argument("--dataset", help="cifar10, mnist, fashion_mnist or digits (default: the "
                                     "checkpoint's)")
    p.add_argument("--data-dir", help="where the data set files are (default: the checkpoint's)")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--eps", type=float, help="L-inf radius in [0, 1] pixel space "
                                             "(default: the checkpoint's eps)")
    p.add_argument("--start", type=int, default=0, help="first input index (default 0)")
    p.add_argument("--end", type=int, help="one past the last index (default: all, or "
                                           "start + n_inputs of the config)")
    p.add_argument("--vnnlib", help="a VNN-LIB property (plain or .gz) instead of a data set")
    p.add_argument("--solver", choices=("highs", "gurobi", "auto"))
    p.add_argument("--timeout-per-input", type=float, help="seconds for the whole cascade")
    p.add_argument("--out", help="JSONL results file (appended; resumes)")
    p.add_argument("--results", help="with --vnnlib: VNN-COMP's result file (sat with the "
                                     "assignment, unsat, timeout or unknown), written "
                                     "atomically")
    p.add_argument("--retry-unknown", action="store_true",
                   help="certify again the inputs --out holds as unknown (a later try, e.g. with "
                        "a larger --timeout-per-input; the new line supersedes the old)")
    p.add_argument("--config", help="study TOML file; its [certify_test] table is used")
    p.add_argument("--table", default="certify_test", help="table of --config to read")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a CertifyConfig field (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes for the per-input LP/MILP stages (default: one per core; "
                        "1: all in this process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    from pipeline.certify.onnx_import import ModelFormatError
    from pipeline.certify.vnnlib import PropertyFormatError
    from pipeline.checkpoint import CheckpointError
    from pipeline.data import DataError

    bad_input = (_BadInput, ModelFormatError, PropertyFormatError, CheckpointError, DataError,
                 ConfigError, CertifyError, NetError, ResultsFileError, FileNotFoundError)
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            stream=sys.stderr)
        if args.threads:
            torch.set_num_threads(args.threads)
        job = _prepare(args)
    except bad_input as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return job()


def _prepare(args: argparse.Namespace) -> Any:
    """Validate everything (model, data or property, config, eps, --out) and return the run;
    nothing is written before this returns."""
    if args.workers < 1:
        raise CertifyError(f"--workers {args.workers}: must be >= 1")
    overrides = list(args.overrides)
    if args.solver:
        overrides.append(f"solver={args.solver}")
    if args.timeout_per_input is not None:
        overrides.append(f"timeout_per_input_s={args.timeout_per_input}")
    # A study file without the table gives the defaults (plus the overrides).
    cfg = load_certify_config(args.config, table=args.table, overrides=overrides)
    net, train_cfg = _load_model(args)
    device = _device(args.device)
    if args.out and Path(args.out).exists():
        read_results(args.out, repair=False)  # a malformed file is bad input
    if args.results and not args.vnnlib:
        raise CertifyError("--results is the VNN-COMP answer file of --vnnlib (for a data set "
                           "use --out)")
    if args.results and Path(args.results).is_dir():
        raise CertifyError(f"--results {args.results}: is a directory (give a file name)")
    if args.vnnlib:
        from pipeline.certify.vnnlib import load_vnnlib

        prop = load_vnnlib(args.vnnlib, tuple(net.input_shape))
        if args.out and Path(args.out).exists():
            old = read_results(args.out, repair=False).get(0, {}).get("property")
            if old is not None and old != str(args.vnnlib):
                raise ResultsFileError(f"{args.out}: holds the answer for {old}, not "
                                       f"{args.vnnlib} (use another --out)")
        if prop.n_outputs != _n_outputs(net):
            raise CertifyError(f"{args.vnnlib}: property over {prop.n_outputs} outputs, the "
                               f"network has {_n_outputs(net)}")
        return lambda: _run_vnnlib(net, prop, cfg, args, device)
    dataset_name = args.dataset or (train_cfg.data.dataset if train_cfg else None)
    if dataset_name is None:
        raise CertifyError("--dataset is needed (or --vnnlib) for an ONNX model")
    data_dir = args.data_dir or (train_cfg.data.data_dir if train_cfg else "data")
    eps = args.eps if args.eps is not None else (train_cfg.eps if train_cfg else None)
    if eps is None:
        raise CertifyError("--eps is needed for an ONNX model")
    if not eps >= 0:
        raise CertifyError(f"--eps {eps}: must be >= 0")
    data_cfg = DataConfig(dataset=dataset_name, data_dir=str(data_dir), download=False)
    dataset = _load_data(data_cfg, args.split)
    if len(dataset):
        shape = tuple(dataset[0][0].shape)
        if shape != tuple(net.input_shape):
            raise CertifyError(f"{dataset_name} images have shape {shape}, the model expects "
                               f"{tuple(net.input_shape)}")
    if args.start < 0 or (args.end is not None and args.end < args.start):
        raise CertifyError(f"--start {args.start} / --end {args.end}: need 0 <= start <= end")
    if args.out and Path(args.out).exists():
        _check_resumed(read_results(args.out, repair=False), eps, args.out)
    return lambda: _run_dataset(net, dataset, eps, cfg, args, device)


def _run_dataset(net: Net, dataset: Any, eps: float, cfg: CertifyConfig,
                 args: argparse.Namespace, device: torch.device) -> int:
    summary = certify_dataset(net, dataset, args.split, eps, cfg, args.out, start=args.start,
                              end=args.end, device=str(device), progress=not args.no_progress,
                              retry_unknown=args.retry_unknown, workers=args.workers)
    print(format_summary(summary))
    for method, stats in summary["by_method"].items():
        print(f"  {method}: {stats['n']} inputs, time mean {stats['time_mean_s']:.3f}s median "
              f"{stats['time_median_s']:.3f}s p95 {stats['time_p95_s']:.3f}s")
    return 0


def _run_vnnlib(net: Net, prop: Any, cfg: CertifyConfig, args: argparse.Namespace,
                device: torch.device) -> int:
    done = read_results(args.out) if args.out else {}
    if 0 in done:  # resumed (_prepare checked that it is this property's line)
        answer = done[0].get("answer", "unknown")
        if args.results:
            write_atomically(args.results, vnncomp_result(answer, done[0].get("counterexample"),
                                                          done[0].get("outputs")))
        print(answer)
        return 0
    answer, result = certify_vnnlib(net, prop, cfg, str(device))
    row = {**result.to_json(), "property": str(args.vnnlib), "answer": answer}
    if answer == "sat":
        row["counterexample"] = result.counterexample
        row["outputs"] = result.outputs
    if args.results:
        write_atomically(args.results, vnncomp_result(answer, result.counterexample,
                                                      result.outputs))
    writer = ResultsWriter(args.out)
    try:
        writer.write(row)
    finally:
        writer.close()
    log.info("%s: %s (%s, %.2fs)", args.vnnlib, answer, result.method, result.time_s)
    print(answer)
    return 0


# ---------------------------------------------------------------------------------------------
# Loading


def _load_model(args: argparse.Namespace) -> tuple[Net, Any]:
    path = Path(args.model)
    if not path.is_file():
        raise CertifyError(f"{path}: no such model file")
    mean, std = _floats(args.mean, "--mean"), _floats(args.std, "--std")
    if path.suffix.lower() == ".onnx":
        from pipeline.certify.onnx_import import load_onnx

        return load_onnx(path, mean, std).eval(), None
    if mean is not None or std is not None:
        raise CertifyError("--mean/--std apply to ONNX models only (a checkpoint's network "
                           "normalises its input itself)")
    return load_project_checkpoint(path)


def load_project_checkpoint(path: str | Path) -> tuple[Net, Any]:
    """A checkpoint of this project ({"model": state_dict, "config": TrainConfig dict}) as a Net
    built for its data set (shape, normalisation, classes from pipeline.data.DATASET_INFO)."""
    from pipeline.checkpoint import CheckpointError, load_checkpoint
    from pipeline.config import TrainConfig, from_dict
    from pipeline.data import DATASET_INFO
    from pipeline.nets import build_net

    state = load_checkpoint(path)
    try:
        train_cfg = from_dict(TrainConfig, state["config"])
        info = DATASET_INFO[train_cfg.data.dataset]
        net = build_net(train_cfg.net, info.input_shape, info.mean, info.std, info.num_classes)
        net.load_state_dict(state["model"])
    except (KeyError, RuntimeError, ConfigError, NetError, TypeError) as err:
        raise CheckpointError(f"{path}: not a training checkpoint of this project "
                              f"({_one_line(err)[:200]})") from None
    return net.eval(), train_cfg


def _load_data(data: Any, split: str) -> Any:
    if isinstance(data, DataConfig):
        from pipeline.data import load_split

        return load_split(data, split)
    return data


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise CertifyError(f"{flag} {text!r}: expected a comma list of numbers") from None
    if not values:
        raise CertifyError(f"{flag}: empty list")
    return values


def _device(name: str | torch.device | None) -> torch.device:
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CertifyError(f"--device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CertifyError(f"--device {name}: CUDA is not available")
    return device


def _n_outputs(net: Net) -> int:
    return int(np.prod(net.shapes()[-1]))


def _progress_bar(enabled: bool, initial: int, total: int) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="certify", unit="input",
                dynamic_ncols=True, file=sys.stderr)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


__all__ = ["certify_dataset", "certify_vnnlib", "vnncomp_result", "write_atomically", "main",
           "read_results", "summarize",
           "format_summary", "load_project_checkpoint", "ResultsFileError"]
