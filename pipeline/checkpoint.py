"""Atomic plain-dict checkpoints and append-only JSONL files.

Checkpoints hold only tensors and builtins, so ``torch.load(..., weights_only=True)`` reads them and
loading never executes pickled code. Writes go to a temporary file in the same folder, are fsynced
and then renamed over the target, so a crash leaves either the old or the new file, never half.

    save_checkpoint({"model": net.state_dict(), ...}, run_dir / "last.pt")
    state = load_checkpoint(run_dir / "last.pt")
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint or results file that is missing, truncated, corrupt or unsafe."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    import io

    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; any problem is one CheckpointError line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, garbage bytes, or a pickle with code in it
        text = str(err).strip()
        if "Weights only load failed" in text:
            # torch's message suggests weights_only=False: never do that for an unknown file.
            detail = next((line.strip() for line in text.splitlines()[1:]
                           if "GLOBAL" in line or "Unsupported" in line), "")
            raise CheckpointError(
                f"{path}: not a valid checkpoint: the weights-only loader refused it (corrupt, "
                f"or pickled objects other than tensors and plain data; nothing in it was run)"
                f"{': ' + detail if detail else ''}"
            ) from None
        first = text.splitlines()[0] if text else type(err).__name__
        raise CheckpointError(f"{path}: not a valid checkpoint (truncated or corrupt: "
                              f"{first[:200]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint of this project (no dict inside)")
    return state


def rng_state() -> dict[str, Any]:
    """All RNG states as tensors and builtins (weights_only-safe)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": [list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    keys, gauss = state["python"]
    random.setstate((3, tuple(keys), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync it, so a crash loses at most the line being written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | Path, repair: bool = True) -> list[dict[str, Any]]:
    """Records of a JSONL file; a torn last line (a crash mid-write) is dropped and, with
    ``repair``, cut from the file so later appends start on a clean line."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    records, good_end = [], 0
    lines = raw.splitlines(keepends=True)
    for number, line in enumerate(lines, 1):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("torn line")
            records.append(json.loads(line))
            good_end += len(line)
        except ValueError:
            if number == len(lines):
                break  # the line being written when the process died
            raise CheckpointError(f"{path}:{number}: corrupt line in the middle of the file; "
                                  "fix or remove it by hand") from None
    if repair and good_end != len(raw):
        with path.open("r+b") as fh:
            fh.truncate(good_end)
    return records


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
