"""``--dtype auto`` on a CPU: the first measurement on a machine is kept in the user's cache and every
later process reads it, so a rate ratio near :data:`FAST_RATIO` cannot flip the answer (and with it
the numbers a user gets) from one run to the next."""

from __future__ import annotations

import json

import pytest

from depthlens.model import precision
from depthlens.model.precision import DECISIONS, FAST_BFLOAT16_ENV, FAST_RATIO, bfloat16_is_fast, machine_key


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty user cache, no forced answer, and no answer remembered by this process; yields a
    function that makes the next measurement return a bfloat16/float32 rate ratio and counts them."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(FAST_BFLOAT16_ENV, raising=False)
    precision._cpu_decision.cache_clear()
    measured = []

    def measure_as(ratio: float) -> None:
        def rates():
            measured.append(ratio)
            return {"float32": 100.0, "bfloat16": 100.0 * ratio}
        monkeypatch.setattr(precision, "product_rates", rates)

    yield measure_as, measured, tmp_path.joinpath("depthlens", *DECISIONS)
    precision._cpu_decision.cache_clear()


def _new_process() -> None:
    precision._cpu_decision.cache_clear()


def test_the_first_answer_on_a_machine_is_kept_for_later_processes(fresh):
    """Planted bug: measuring afresh in every process; the second measurement here says otherwise."""
    measure_as, measured, path = fresh
    measure_as(FAST_RATIO + 0.15)
    assert bfloat16_is_fast() is True
    _new_process()
    measure_as(FAST_RATIO - 0.2)  # the other core got busy
    assert bfloat16_is_fast() is True
    assert measured == [FAST_RATIO + 0.15]
    record = json.loads(path.read_text())
    assert record == {machine_key(): {"float32": 100.0, "bfloat16": round(100.0 * (FAST_RATIO + 0.15), 1), "fast": True}}


def test_another_kernel_cap_or_thread_count_is_measured_for_itself(fresh, monkeypatch):
    """Planted bug: one answer for the whole machine, though ``ATEN_CPU_CAPABILITY=avx2`` or
    ``ONEDNN_MAX_CPU_ISA`` makes bfloat16 emulated and slow."""
    measure_as, measured, path = fresh
    measure_as(4.0)
    assert bfloat16_is_fast() is True
    _new_process()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    measure_as(0.1)
    assert bfloat16_is_fast() is False
    assert measured == [4.0, 0.1] and len(json.loads(path.read_text())) == 2


@pytest.mark.parametrize("damage", ["{not json", "[1, 2]", '{"KEY": {"fast": "yes"}}'])
def test_a_damaged_record_is_measured_again_and_rewritten(fresh, damage):
    measure_as, measured, path = fresh
    path.parent.mkdir(parents=True)
    path.write_text(damage.replace("KEY", machine_key()))
    measure_as(0.5)
    assert bfloat16_is_fast() is False
    assert measured == [0.5] and json.loads(path.read_text())[machine_key()]["fast"] is False


def test_an_unwritable_cache_still_answers(fresh):
    """A read-only home: the answer holds for this process, and nothing is raised."""
    measure_as, measured, path = fresh
    path.parent.parent.mkdir(parents=True)
    path.parent.write_text("a file where the folder should be")
    measure_as(3.0)
    assert bfloat16_is_fast() is True and measured == [3.0]


def test_a_forced_answer_wins_over_the_kept_one(fresh, monkeypatch):
    measure_as, measured, _ = fresh
    measure_as(4.0)
    assert bfloat16_is_fast() is True
    monkeypatch.setenv(FAST_BFLOAT16_ENV, "0")
    assert bfloat16_is_fast() is False and measured == [4.0]


ZEN1 = "fpu vme sse2 avx fma avx2 sha_ni"
ZEN4 = "fpu avx2 fma avx512f avx512dq avx512_bf16 avx512vl"
XEON = "avx2 fma avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8"


@pytest.mark.parametrize(("flags", "expected"), [
    (ZEN1, "AMD EPYC (avx2, fma)"),
    (ZEN4, "AMD EPYC (avx2, fma, avx512f, avx512_bf16)"),
    (XEON, "AMD EPYC (avx2, fma, avx512f, avx512_bf16, avx512_fp16, amx_bf16, amx_tile)"),
])
def test_one_model_name_on_two_cpu_generations_gives_two_machine_keys(monkeypatch, tmp_path, flags, expected):
    """Planted bugs: the description without the flags (a virtual machine calls a Zen 1 and a Zen 4
    "AMD EPYC" alike, so a Zen 4's kept bfloat16 answer or its check records would pass for a Zen 1's),
    or flags found as substrings of others ("avx512f" inside "avx512fp16")."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    monkeypatch.setattr(precision, "CPUINFO", cpuinfo)
    assert precision.cpu_description() == expected
    assert machine_key().startswith(expected + " · ")
    cpuinfo.write_text("model name\t: AMD EPYC\nflags\t\t: avx2 avx512fp16\n")
    assert precision.cpu_flags() == ["avx2"]
