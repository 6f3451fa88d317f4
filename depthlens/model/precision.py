"""Compute precision: float32 everywhere, or bfloat16 matrix products where they are fast.

Evaluation, trajectories and training are bound by matrix products: the model's forward pass and,
above all, the unembedding (``tokens × d × vocab`` multiply-adds per layer decoded). On CPUs with
AMX or AVX-512-BF16 a bfloat16 product of those shapes runs several times faster than a float32
one; on CPUs with only AVX2 it runs several times *slower*, because bfloat16 is emulated. So the
choice is made at run time:

- :func:`resolve_dtype` turns ``"auto" | "float32" | "bfloat16"`` into a ``torch.dtype``; ``"auto"``
  is bfloat16 where :func:`bfloat16_is_fast` says so and float32 elsewhere.
- :func:`bfloat16_is_fast` times small bfloat16 and float32 products (about 0.1 s with AMX; up to
  about 0.4 s where bfloat16 is emulated), the best of five each, alternating, so that other
  processes' load hits both alike. On CUDA it is whether the GPU supports bfloat16. It times the
  kernels PyTorch would really use, so caps such as ``ATEN_CPU_CAPABILITY`` or
  ``ONEDNN_MAX_CPU_ISA`` count as they should (on one AMX machine, one thread: bfloat16 ran 4–10×
  faster than float32; capped with ``ONEDNN_MAX_CPU_ISA=AVX2``, 8× slower). The first answer on a
  machine is kept in the user's cache (:data:`DECISIONS`, keyed by :func:`machine_key`), and later
  processes read it: on an AMD EPYC without AMX the ratio measured 2.15 on a quiet core and below
  :data:`FAST_RATIO` with the other core busy, so deciding afresh each run would flip the numbers a
  user gets between runs. Delete the file to measure again. The environment variable
  :data:`FAST_BFLOAT16_ENV` (``1`` or ``0``) replaces both, to force either path.
- :func:`computing_in` is the context in which forward passes and decoding run (the forward pass
  stays float32 for families whose rule says so: gemma3's per-layer KLs moved by over 1% with a
  bfloat16 forward, :meth:`~depthlens.model.architecture.ModelParts.forward_dtype`): for bfloat16,
  ``torch.autocast`` (products in bfloat16 with float32 accumulation inside the kernels; norms,
  softmax and the residual stream stay float32) plus cached bfloat16 copies of the frozen model
  weights, so each weight is rounded once per process instead of on every call. Log-softmax and
  every statistic are computed in float32 by their callers (:mod:`depthlens.stats.divergences`).

Within a product each input is rounded to bfloat16 (relative error at most ``2⁻⁸``) and the output
is rounded once more; the sums themselves are float32. :func:`full_precision` turns it off inside a
block: a tuned lens's translators run in float32 (their outputs join the float32 residual stream,
whose coordinates reach the thousands on gemma3, and they cost ``d / vocab`` of a decoding), and so
does the last layer's decoding for a family whose forward pass stays float32, since that decoding
is the model's own output head.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from depthlens.atomic import write_file
from depthlens.errors import OutputError, UsageError
from depthlens.model.cache import user_cache

DtypeName = Literal["auto", "float32", "bfloat16"]
DTYPE_NAMES: tuple[str, ...] = ("auto", "float32", "bfloat16")
"""The values ``--dtype`` and every ``dtype=`` parameter accept."""
FAST_BFLOAT16_ENV = "DEPTHLENS_FAST_BFLOAT16"
"""Set to ``1`` or ``0`` to say whether bfloat16 products are fast here, instead of timing them."""
PROBE_SHAPE = (128, 512, 2048)
"""``(tokens, d, vocab)`` of the timed product: small, and shaped like a slice of an unembedding."""
FAST_RATIO = 2.0
"""bfloat16 counts as fast when its products run at least this many times faster than float32:
below that, the rounding of inputs and outputs eats most of the gain."""
DECISIONS = ("precision", "bfloat16.json")
"""Where, under :func:`~depthlens.model.cache.user_cache`, each machine's measured rates and answer are
kept: ``{machine_key: {"float32": GFLOP/s, "bfloat16": GFLOP/s, "fast": bool}}``."""


def resolve_dtype(dtype: DtypeName | str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """``torch.float32`` or ``torch.bfloat16`` for ``dtype`` (a name in :data:`DTYPE_NAMES` or a
    ``torch.dtype``) on ``device``; ``"auto"`` asks :func:`bfloat16_is_fast`. Raises
    :class:`~depthlens.errors.UsageError` for anything else."""
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = str(dtype)
    if name not in DTYPE_NAMES:
        raise UsageError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_NAMES)}")
    if name == "auto":
        return torch.bfloat16 if bfloat16_is_fast(device) else torch.float32
    return getattr(torch, name)


def bfloat16_is_fast(device: torch.device | str = "cpu") -> bool:
    """Whether bfloat16 matrix products beat float32 ones by :data:`FAST_RATIO` on ``device``'s
    type: the :data:`FAST_BFLOAT16_ENV` variable if set, else GPU support on CUDA, else a timing
    made once per machine (:func:`product_rates`, kept under :data:`DECISIONS`); other devices: no."""
    forced = os.environ.get(FAST_BFLOAT16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise UsageError(f"{FAST_BFLOAT16_ENV} must be 1 or 0, got {forced!r}; set it to 1, 0, or unset it")
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind != "cpu":
        return False
    return _cpu_decision(machine_key())


CPUINFO = Path("/proc/cpuinfo")
"""Where Linux describes the CPU (:func:`cpu_name`, :func:`cpu_flags`)."""
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
"""The CPU flags that decide how fast float32 and bfloat16 products run."""


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line's value in :data:`CPUINFO` (None where there is none)."""
    try:
        with CPUINFO.open(encoding="utf-8") as lines:
            for line in lines:
                if line.partition(":")[0].strip() == field:
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s, as ``lscpu`` shows it; elsewhere what ``platform`` says)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """Which of :data:`CPU_FLAGS` the CPU has, in that order (empty where ``/proc/cpuinfo`` is missing).
    Virtual machines may show one model name for CPUs of several generations ("AMD EPYC" for one
    with AVX2 alone and one with AVX-512 and AVX-512-BF16), so records name the flags beside it."""
    flags = set((_cpuinfo("flags") or "").split())
    return [flag for flag in CPU_FLAGS if flag in flags]


def cpu_description() -> str:
    """The CPU's model name and its :func:`cpu_flags`, e.g. ``"AMD EPYC (avx2, fma)"``."""
    flags = cpu_flags()
    return f"{cpu_name()} ({', '.join(flags)})" if flags else cpu_name()


def machine_key() -> str:
    """What the CPU timing depends on: the CPU's model name and flags (:func:`cpu_description`), the
    kernels PyTorch dispatches to (its CPU capability and ``ONEDNN_MAX_CPU_ISA``), PyTorch's version
    and the thread count."""
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "any")
    return (f"{cpu_description()} · {torch.backends.cpu.get_cpu_capability()} · oneDNN {onednn} · torch {torch.__version__} · "
            f"{torch.get_num_threads()} threads")


@functools.cache
def _cpu_decision(key: str) -> bool:
    """The kept answer for ``key`` (:data:`DECISIONS`), else :func:`product_rates` measured now and kept;
    an unreadable record is measured again, and an unwritable cache leaves the answer to this process."""
    path = user_cache(*DECISIONS)
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    entry = known.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("fast"), bool):
        return entry["fast"]
    rates = product_rates()
    fast = rates["bfloat16"] >= FAST_RATIO * rates["float32"]
    known[key] = {**{name: round(rate, 1) for name, rate in rates.items()}, "fast": fast}
    try:
        write_file(path, (json.dumps(known, indent=1, sort_keys=True) + "\n").encode())
    except OutputError:
        pass
    return fast


@functools.cache
def product_rates(shape: tuple[int, int, int] = PROBE_SHAPE, repeats: int = 5) -> dict[str, float]:
    """Measured CPU rates of ``x @ wᵀ`` for ``x [tokens, d]`` and ``w [vocab, d]`` in
    ``shape = (tokens, d, vocab)``, in GFLOP/s (``2 · tokens · d · vocab`` per product), by dtype
    name (``"float32"``, ``"bfloat16"``): the best of ``repeats`` timed products after one warm-up,
    the two dtypes alternating. Measured once per process and shape."""
    tokens, d, vocab = shape
    generator = torch.Generator().manual_seed(0)
    inputs = {name: (torch.randn(tokens, d, generator=generator).to(dtype),
                     torch.randn(vocab, d, generator=generator).to(dtype))
              for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    best = dict.fromkeys(inputs, float("inf"))
    for _ in range(repeats + 1):
        for name, (x, w) in inputs.items():
            started = time.perf_counter()
            nn.functional.linear(x, w)
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: 2 * tokens * d * vocab / seconds / 1e9 for name, seconds in best.items()}


@contextmanager
def computing_in(dtype: torch.dtype, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the forward passes and decoding inside the block with products in ``dtype`` on
    ``device``'s type: nothing changes for float32; for bfloat16, ``torch.autocast`` with cached
    bfloat16 copies of frozen float32 weights (:class:`_FrozenWeights`). Results of products come
    out in bfloat16; callers take log-softmax and statistics in float32."""
    if dtype == torch.float32:
        yield
        return
    if dtype != torch.bfloat16:
        raise UsageError(f"products can run in float32 or bfloat16, not {dtype}; pick one of those")
    with torch.autocast(torch.device(device).type, dtype=dtype), _FrozenWeights(dtype):
        yield


def float32_logits(
    decoded: Iterable[tuple[int, torch.Tensor]], dtype: torch.dtype, device: torch.device | str = "cpu",
    copy: bool = True,
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(layer, logits)`` pairs of a readout's ``iter_logits`` (not yet started), each decoded
    inside :func:`computing_in` ``(dtype, device)`` and handed on in float32 ``[..., vocab]``
    (``copy=False``: as decoded, for a consumer that reads low precision itself, like the compiled
    statistics kernel).

    Low-precision logits are copied into one float32 buffer reused for every layer: a fresh
    float32 tensor of a 49k-token unembedding's logits costs more in page faults than the copy
    itself. So each pair is valid only until the next one is asked for. Only the decoding runs
    in the context; what the caller does with the logits runs outside it."""
    pairs = iter(decoded)
    buffer: torch.Tensor | None = None
    while True:
        with computing_in(dtype, device):
            pair = next(pairs, None)
        if pair is None:
            return
        layer, logits = pair
        if copy and logits.dtype != torch.float32:
            if buffer is None or buffer.numel() < logits.numel() or buffer.device != logits.device:
                buffer = torch.empty(logits.numel(), device=logits.device)
            logits = buffer[: logits.numel()].view(logits.shape).copy_(logits)
        yield layer, logits


_LOWERED: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""Frozen float32 parameter → ``(its version when copied, its bfloat16 copy)``; an entry goes
when its parameter does, and is remade when the parameter is changed in place."""


def lowered(parameter: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The cached ``dtype`` copy of the frozen ``parameter`` (made on first use, and again after
    any in-place change of it)."""
    entry = _LOWERED.get(parameter)
    if entry is None or entry[0] != parameter._version or entry[1].dtype != dtype:
        entry = (parameter._version, parameter.detach().to(dtype))
        _LOWERED[parameter] = entry
    return entry[1]


class _FrozenWeights(TorchFunctionMode):
    """Swaps each frozen float32 :class:`~torch.nn.Parameter` given to ``F.linear`` for its cached
    low-precision copy (:func:`lowered`). Autocast would round it again on every call (about 0.1 s
    for a 49k × 576 unembedding on one core, longer than the product itself), since it caches only
    weights that require gradients. Torch function modes are per thread, so other threads using
    the same model in float32 are not affected."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is nn.functional.linear:
            args = tuple(self._swap(arg) for arg in args)
            kwargs = {name: self._swap(value) for name, value in kwargs.items()}
        return func(*args, **kwargs)

    def _swap(self, value: Any) -> Any:
        frozen = isinstance(value, nn.Parameter) and not value.requires_grad and value.dtype == torch.float32
        return lowered(value, self.dtype) if frozen and torch.is_autocast_enabled(value.device.type) else value


@contextmanager
def full_precision(device: torch.device | str = "cpu") -> Iterator[None]:
    """float32 products inside a :func:`computing_in` block: autocast is off on ``device``'s type,
    so frozen weights are not swapped for their low-precision copies either. For the small
    products whose outputs join the float32 residual stream (a tuned lens's translators), and for
    the output head of a family whose forward pass stays float32."""
    with torch.autocast(torch.device(device).type, enabled=False):
        yield


@contextmanager
def without_subnormals() -> Iterator[None]:
    """Flush subnormal float32 values (below ``1.2e-38``) to zero on the CPU inside the block, and
    restore PyTorch's default (kept) after it. Decoding near one-hot distributions (the logit lens
    at the embeddings) makes subnormal probabilities and gradients, and products that meet them run
    several times slower: a causal-basis search there ran 7× faster with them flushed. Each flushed
    value is below ``1.2e-38``; only a computation that branches on differences that small (an
    optimiser's convergence test) can end elsewhere. Sets the calling thread's mode, so a run on one
    thread, as the docs' runs are, gets all of it."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


__all__ = [
    "CPUINFO",
    "CPU_FLAGS",
    "DECISIONS",
    "DTYPE_NAMES",
    "FAST_BFLOAT16_ENV",
    "FAST_RATIO",
    "PROBE_SHAPE",
    "DtypeName",
    "bfloat16_is_fast",
    "computing_in",
    "cpu_description",
    "cpu_flags",
    "cpu_name",
    "float32_logits",
    "full_precision",
    "lowered",
    "machine_key",
    "product_rates",
    "resolve_dtype",
    "without_subnormals",
]
