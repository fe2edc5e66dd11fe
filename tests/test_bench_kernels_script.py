"""The smoke run of the GPU kernel benchmark (bench/bench_kernels.py --smoke: every section on CPU
through the Triton interpreter) in the default test run. The tests live in
bench/test_bench_kernels_smoke.py (pytest.ini's testpaths leave bench/ out); this module loads them.
Its name differs from that file's on purpose: two test modules of one basename in folders without
__init__.py cannot be collected in one pytest session ("import file mismatch")."""
import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "_bench_test_bench_kernels_smoke",
    Path(__file__).resolve().parents[1] / "bench" / "test_bench_kernels_smoke.py")
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)

# the subprocess run takes ~15-20 s on 2 CPU cores
test_smoke_run_writes_every_section = pytest.mark.slow(_mod.test_smoke_run_writes_every_section)
test_failing_case_is_recorded_on_gpu_and_raised_in_smoke = _mod.test_failing_case_is_recorded_on_gpu_and_raised_in_smoke
test_bad_invocations_exit_2 = _mod.test_bad_invocations_exit_2
test_cases_past_the_deadline_are_skipped_and_reported = _mod.test_cases_past_the_deadline_are_skipped_and_reported
