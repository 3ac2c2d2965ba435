"""Reading the certifier's input files (ONNX models, VNN-LIB properties): the bytes of a plain
or gzipped file, and errors that fit on one line and name the file.

    data = read_maybe_gzipped(path, PropertyFormatError, "bad gzip data ({err})", gz_suffix=True)

Used by :mod:`pipeline.certify.onnx_import` and :mod:`pipeline.certify.vnnlib`; nothing to run.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Any


def one_line(text: Any) -> str:
    """``text`` with every run of white space (newlines included) folded to one space."""
    return " ".join(str(text).split())


def read_maybe_gzipped(path: Path, error: type[ValueError], bad_gzip: str,
                       gz_suffix: bool = False) -> bytes:
    """The bytes of ``path``, decompressed when they start with the gzip magic (or, with
    ``gz_suffix``, when the name ends in .gz). A missing or unreadable file, or bad gzip data
    (``bad_gzip``, formatted with ``err``), raises ``error`` with one line naming the file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as err:
        raise error(one_line(f"{path}: cannot read ({err})")) from None
    if data[:2] == b"\x1f\x8b" or (gz_suffix and path.suffix == ".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise error(one_line(f"{path}: {bad_gzip.format(err=err)}")) from None
    return data
