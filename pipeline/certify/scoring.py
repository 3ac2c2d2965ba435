"""Validation scoring: natural, PGD-robust and certified counts of a network on a data set,
with per-image outcomes for paired comparisons of trials (what ``pipeline.tune`` scores).

    scores = certified_accuracy(net, (images, labels), eps=0.1, cfg=CertifyConfig(),
                                max_inputs=500)
    scores["nat_acc"], scores["pgd_acc"], scores["cert_acc"], scores["per_image"]["cert"]

Each input gets the verdict :class:`pipeline.certify.cascade.Certifier` gives it on its own; the
cheap stages run on batches. Nothing to run on its own (``benchmarks/scoring_speed.py`` times it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from pipeline.certify.cascade import Certifier
from pipeline.certify.spec import CertifyError
from pipeline.config import CertifyConfig
from pipeline.nets import Net


def certified_accuracy(net: Net, data: Any, eps: float, cfg: CertifyConfig | None = None,
                       max_inputs: int | None = None, *, batch_size: int = 256,
                       device: str | torch.device | None = None) -> dict[str, Any]:
    """Natural, PGD-robust and certified counts (and rates) on up to ``max_inputs`` inputs.

    ``data``: a DataLoader / iterable of (x, y) batches, an (images, labels) pair of tensors or an
    indexable data set of (image, label). The cascade of :meth:`Certifier.certify_batch`: clean,
    quick attack, zonotope and slopes on batches (chunked to the memory cap), the full attack on
    the inputs still open, then (``cfg.lp_refine``, ``cfg.milp``) LP and MILP per input; input i
    (counted from 0) gets the verdict ``Certifier.certify(x_i, y_i, eps, index=i)`` gives it.
    ``per_image``: {"nat", "pgd", "cert"} -> lists of n bools (:class:`PerImage`, JSON-ready,
    with a tensor's ``tolist()``), one per input in order, for paired comparisons of trials.
    """
    cfg = cfg or CertifyConfig()
    if not eps >= 0:
        raise CertifyError(f"eps = {eps}: must be >= 0")
    device = device if device is not None else next(net.parameters()).device
    certifier = Certifier(net, cfg, device)
    t0 = time.perf_counter()
    counts = {"n": 0, "nat": 0, "pgd": 0, "cert": 0}
    per_image: dict[str, list[Tensor]] = {"nat": [], "pgd": [], "cert": []}
    for x, y in _batches(data, batch_size, max_inputs):
        out = _verdicts(certifier, x, y, eps, start_index=counts["n"])
        counts["n"] += len(y)
        for k in ("nat", "pgd", "cert"):
            counts[k] += int(out[k].sum())
            per_image[k].append(out[k].cpu())
    n = max(counts["n"], 1)
    # Per-image outcomes, in input order, for paired comparisons of trials on the same images.
    # Lists of bools (JSON-ready: the scores dict may be stored as Optuna user attributes) that
    # also answer .tolist() as a tensor would.
    per = {k: PerImage(bool(b) for t in v for b in t.tolist()) for k, v in per_image.items()}
    return {**counts, "nat_acc": counts["nat"] / n, "pgd_acc": counts["pgd"] / n,
            "cert_acc": counts["cert"] / n, "time_s": time.perf_counter() - t0,
            "per_image": per}


class PerImage(list):
    """Per-image outcomes of :func:`certified_accuracy`: a list of bools with ``tolist()``."""

    def tolist(self) -> list[bool]:
        return list(self)


def _batches(data: Any, batch_size: int, max_inputs: int | None
             ) -> Iterable[tuple[Tensor, Tensor]]:
    limit = math.inf if not max_inputs else max_inputs
    seen = 0
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        images, labels = data
        data = [(images[i: i + batch_size], torch.as_tensor(labels[i: i + batch_size]))
                for i in range(0, len(images), batch_size)]
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__") and \
            not isinstance(data, torch.utils.data.DataLoader):
        ds = data
        data = ((torch.stack([ds[j][0] for j in range(i, min(i + batch_size, len(ds)))]),
                 torch.tensor([int(ds[j][1]) for j in range(i, min(i + batch_size, len(ds)))]))
                for i in range(0, len(ds), batch_size))
    for x, y in data:
        if seen >= limit:
            return
        take = int(min(len(y), limit - seen))
        seen += take
        yield x[:take], torch.as_tensor(y)[:take]


def _verdicts(certifier: Certifier, x: Tensor, labels: Tensor, eps: float, start_index: int = 0
              ) -> dict[str, Tensor]:
    """The cascade on a batch (:meth:`Certifier.certify_batch`, inputs numbered from
    ``start_index``): (B,) bool tensors nat (correct clean prediction), pgd (not falsified)
    and cert, the verdicts :meth:`Certifier.certify` gives each input."""
    labels = torch.as_tensor(labels).reshape(-1)
    results = certifier.certify_batch(x, labels, eps,
                                      range(start_index, start_index + len(labels)))
    nat = torch.tensor([r.status != "misclassified" and r.method != "nonfinite"
                        for r in results], dtype=torch.bool)
    pgd = nat & torch.tensor([r.status != "falsified" for r in results], dtype=torch.bool)
    cert = torch.tensor([r.status == "certified" for r in results], dtype=torch.bool)
    return {"nat": nat, "pgd": pgd, "cert": cert}
