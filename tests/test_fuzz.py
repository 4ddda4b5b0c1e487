"""Property-based fuzzing of every parser that reads outside bytes (issue 18), short run.

The cases, seeds and mutations are bench/fuzz.py's; Hypothesis draws the mutations here. Each
input must give a result or the parser's own error class with a message: nothing else, and no
more memory than the decode limits allow. `pytest -m fuzz tests/test_fuzz.py` runs the same
cases with many more examples; bench/fuzz.py runs them for minutes (with atheris if installed).
"""

from __future__ import annotations

import importlib.util
import os
import resource
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

BENCH = Path(__file__).resolve().parent.parent / "bench" / "fuzz.py"
_spec = importlib.util.spec_from_file_location("medfm_bench_fuzz", BENCH)
fuzz = sys.modules["medfm_bench_fuzz"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)

OP = st.tuples(
    st.sampled_from(fuzz.OPS), st.integers(0, 2**32 - 1), st.binary(min_size=1, max_size=4)
)
MUTATIONS = st.lists(OP, min_size=1, max_size=6)
# Examples per case in the short run: the cheap byte parsers get more than the cases that
# copy and verify a whole shard set per input. About 20 s in all.
SHORT = {"tar": 40, "tar_in_set": 20, "npy": 50, "png": 40, "manifest_json": 20,
         "manifest_parquet": 15, "manifest_rows": 20, "zarr_meta": 15, "zarr_shard_index": 15,
         "safetensors": 10, "medfm_json": 20, "dicom": 10, "wfdb": 10, "edf": 30,
         "csv": 30}  # fmt: skip
LONG = 2000
# Parsers of other modules whose inputs still escape with a foreign exception (found by this
# harness; reported, not fixed here: the code is not medfm.shards').
KNOWN: dict[str, str] = {}  # parser -> known escape; wfdb, medfm_json, dicom, safetensors
# were here until what this harness found in them was fixed
MEMORY_GROWTH = 1 << 30  # peak RSS a whole case may add: far below any bomb's declared size


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Every case prepared once, with low decode limits, as bench/fuzz.py's children run."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDFM_MAX_ARRAY_BYTES", str(256 << 20))
        mp.setenv("MEDFM_MAX_MEMBER_BYTES", str(256 << 20))
        work = tmp_path_factory.mktemp("fuzz")
        prepared = {}
        for name, case in fuzz.CASES.items():
            case.prepare(work)
            prepared[name] = case
        yield prepared


def _fuzz(case, examples: int, shrink: bool) -> None:
    if not case.seeds:
        pytest.skip(f"{case.name}: no seed files (MEDFM_SAMPLE_DATA missing?)")
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if shrink else [])

    @settings(max_examples=examples, deadline=timedelta(seconds=20), phases=phases,
              derandomize=examples != LONG, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(seed=st.integers(0, len(case.seeds) - 1), ops=MUTATIONS)
    def one(seed: int, ops) -> None:
        problem = case.check(fuzz.mutate(case.seeds[seed], ops))
        assert problem is None, f"{case.name}: {problem}"

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    one()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert grown < MEMORY_GROWTH, f"{case.name}: peak memory grew by {grown >> 20} MiB"


def _params():
    for name in fuzz.CASES:
        marks = [pytest.mark.xfail(reason=KNOWN[name], strict=False)] if name in KNOWN else []
        yield pytest.param(name, marks=marks, id=name)


def test_seeds_are_accepted(cases):
    """The unmutated seeds are valid inputs: each parses without any error at all."""
    for case in cases.values():
        for seed in case.seeds:
            case.run(case.work, seed)
    assert os.environ.get("MEDFM_MAX_ARRAY_BYTES") == str(256 << 20)


@pytest.mark.parametrize("name", list(_params()))
def test_mutated_inputs_give_a_result_or_the_modules_error(cases, name):
    _fuzz(cases[name], SHORT[name], shrink=name not in KNOWN)


@pytest.mark.fuzz
@pytest.mark.parametrize("name", list(_params()))
def test_long_fuzz(cases, name, request):
    if "fuzz" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("long fuzzing runs only with -m fuzz")
    _fuzz(cases[name], LONG, shrink=True)
