"""The row sums behind :class:`~depthlens.stats.logit_statistics.LogitStatistics`, in one compiled kernel.

Eager PyTorch pays one pass over ``[rows, vocab]`` per operation: the float32 copy, the maximum,
the shift, ``exp``, the sum, two dot products, the rank's comparison. With bfloat16 products
four times faster than float32 ones (a Xeon with AMX), those passes cost more than the unembedding (a
512-token trajectory of smollm2-135m: 2.8× its bare cost). :func:`row_sums` computes the same
sums with ``torch.compile``, which fuses them into two reads of each row (the maxima of its runs,
whose maximum is the row's, then the rest), and adds each row's distribution to its group's sum
(evaluation's marginals) in the same kernel. ``benchmarks/trajectory.py`` times both against the bare cost (results in
``docs/trajectory/README.md``).

Compiling costs time once per process (see :data:`MIN_FUSED_LOGITS`), so :func:`fused_wanted`
asks for it only on work large enough to win it back, and only on the CPU with a C++ compiler
(on a GPU the eager operations are fast enough). ``DEPTHLENS_FUSED=1`` or ``0`` overrides.
Where compiling fails, one warning is printed and the eager passes are used.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from typing import Any

import torch

from depthlens.errors import UsageError

FUSED_ENV = "DEPTHLENS_FUSED"
"""Set to ``1`` or ``0`` to use the compiled kernel always or never, whatever the size of the work."""
MIN_FUSED_LOGITS = 2**32
"""Work below this many logits (positions × layers × vocabulary: a trajectory of about 2800 tokens
of smollm2-135m's 31 rows, 860 of gemma3-270m's 19) keeps the eager passes. In ``benchmarks/trajectory.py`` the
kernel saved 0–1.9 ns per logit in float32 on an AMD EPYC (1.6–3.5 before the eager passes took
their exponentials by ``exp2``), and setting it up in a process took 3–8 s when torch's disk cache
held it and 25 s when not (both cores busy): at this size it about breaks even with a warm cache,
and the default evaluations (10¹⁰ logits and more) gain."""


def fused_wanted(logits: int, device: torch.device | str = "cpu") -> bool:
    """Whether statistics over ``logits`` logits in all (positions × layers × vocabulary) on
    ``device`` should use the compiled kernel: :data:`FUSED_ENV` if set, else a CPU with a C++
    compiler, work of at least :data:`MIN_FUSED_LOGITS`, and no earlier failure to compile."""
    forced = os.environ.get(FUSED_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1" and not _failed
    if forced:
        raise UsageError(f"{FUSED_ENV} must be 1 or 0, got {forced!r}; set it to 1, 0, or unset it")
    return (torch.device(device).type == "cpu" and logits >= MIN_FUSED_LOGITS and not _failed
            and _compiler_found())


@functools.cache
def _compiler_found() -> bool:
    return shutil.which(os.environ.get("CXX", "g++")) is not None


_failed = False
_worked = False


def _sums(z: torch.Tensor, probs: torch.Tensor, top1: torch.Tensor, targets: torch.Tensor, floor: float,
          width: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The body the kernels compile: ``(shifted logits, log Σ exp, the sums)``, as :func:`row_sums` says."""
    z = z.float()
    whole = z.shape[-1] // width * width
    runs = z[:, :whole].unflatten(-1, (whole // width, width)).amax(-1)
    shift = runs.amax(-1, keepdim=True) if whole else z.amax(-1, keepdim=True)
    if 0 < whole < z.shape[-1]:
        shift = torch.maximum(shift, z[:, whole:].amax(-1, keepdim=True))
    shifted = z - shift
    weights = shifted.clamp_min(floor).exp()
    total = weights.sum(-1)
    log_total = total.log()
    return shifted, log_total, {
        "runs": runs,
        "log_total": log_total,
        "lens_dot": (weights * shifted).sum(-1) / total,
        "reference_dot": (probs * shifted).sum(-1),
        "target_shifted": shifted.gather(-1, targets.clamp_min(0)).squeeze(-1),
        "above_top1": (z > z.gather(-1, top1)).sum(-1, dtype=torch.float32),
        "ties": (z == shift).sum(-1, dtype=torch.float32),
    }


def _scores(z: torch.Tensor, probs: torch.Tensor, top1: torch.Tensor, targets: torch.Tensor, floor: float,
            width: int) -> dict[str, torch.Tensor]:
    """The sums alone (trajectories)."""
    return _sums(z, probs, top1, targets, floor, width)[2]


def _scores_into(z: torch.Tensor, probs: torch.Tensor, top1: torch.Tensor, targets: torch.Tensor, floor: float,
                 width: int, groups: torch.Tensor, totals: torch.Tensor) -> dict[str, torch.Tensor]:
    """The sums, and each row's distribution added to its group's total (evaluation); ``exp`` is
    taken again rather than the weights kept: a ``[n, vocab]`` buffer would cost more."""
    shifted, log_total, sums = _sums(z, probs, top1, targets, floor, width)
    totals.index_add_(0, groups, (shifted.clamp_min(floor) - log_total[:, None]).exp())
    return sums


@functools.cache
def _compiled(into: bool) -> Any:
    """:func:`_scores_into` or :func:`_scores` compiled (made on first use: importing the compiler
    takes a second). Two functions, so each has its own budget of recompiles (one per vocabulary
    and dtype: the number of rows is marked dynamic). Without torch's graph cache: in torch 2.13
    its key leaves out the kernel capability, and a graph compiled under one
    ``ATEN_CPU_CAPABILITY`` gave wrong sums when loaded under another (entropy off by 0.5 nats
    under ``avx2``). The C++ kernels stay cached, keyed by their source."""
    return torch.compile(_scores_into if into else _scores, options={"fx_graph_cache": False})


def row_sums(z: torch.Tensor, probs: torch.Tensor, top1: torch.Tensor, targets: torch.Tensor, floor: float,
             width: int, into: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor] | None:
    """Per-row sums of logits ``z [n, vocab]`` (any float dtype, read as float32) against a
    reference's probabilities ``probs [n, vocab]`` (float32), its top-1 ids ``top1 [n, 1]`` and
    next-token ``targets [n, 1]`` (negative: none, read as 0). With ``t = z − max z`` floored at
    ``floor`` before ``exp`` and ``q = exp t / Σ exp t``, every result is ``[n]`` unless said:

    - ``runs [n, vocab // width]``: the maximum of each run of ``width`` logits (for top-k);
    - ``log_total``: ``log Σ exp t``; ``lens_dot``: ``Σ q t``; ``reference_dot``: ``Σ p t``;
    - ``target_shifted``: ``t`` at the target; ``above_top1``: how many ``z`` exceed the
      reference top-1's; ``ties``: how many equal ``max z`` (both counted in float32, exact below
      2²⁴ entries, because the vectorised loop sums floats faster than 64-bit integers).

    With ``into = (groups [n], totals [m, vocab])`` each row's ``q`` is also added to
    ``totals[groups[i]]``, in the same kernel. The number of rows may change from call to call;
    each vocabulary size and dtype of ``z`` gets its own compile.

    ``None`` if the kernel cannot be compiled here (after one warning; :func:`fused_wanted` is
    false from then on), so the caller falls back to eager passes. Once it has run, errors are
    raised as they come."""
    global _failed, _worked
    arguments = (z, probs, top1, targets, floor, width, *(into or ()))
    for tensor in (z, probs, top1, targets, *(into or ())[:1]):
        torch._dynamo.maybe_mark_dynamic(tensor, 0)
    if _worked:
        return _compiled(into is not None)(*arguments)
    try:
        sums = _compiled(into is not None)(*arguments)
    except Exception as error:  # noqa: BLE001 - any failure of the first compile means: use the eager passes
        _failed = True
        print(f"depthlens: compiling the statistics kernel failed ({type(error).__name__}); using eager "
              f"passes, slower but equal. Install a C++ compiler or set {FUSED_ENV}=0 to silence this.",
              file=sys.stderr)
        return None
    _worked = True
    return sums


__all__ = ["FUSED_ENV", "MIN_FUSED_LOGITS", "fused_wanted", "row_sums"]
