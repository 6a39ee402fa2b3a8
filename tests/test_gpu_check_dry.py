"""The machinery of ``make gpu-check`` that a CPU machine can check (scripts/gpu_check*.py).

The GPU run itself happens only on a lent GPU; what decides whether that run proves anything --
which tests it selects, how it reads compute-sanitizer's and pytest's output, how it stops a
step at its deadline, what its JSON must hold -- is checked here, in about a second.
``make gpu-check-dry`` (CI) runs the whole script without the GPU parts.
"""
import os
import sys
import time
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import gpu_check  # noqa: E402
import gpu_check_select  # noqa: E402


class FakeItem:
    """What gpu_check_select reads of a collected pytest item."""

    def __init__(self, name, params=None, markers=(), skip_reason=None):
        self.name = name
        self.originalname = name.split("[")[0]
        if params is not None:
            self.callspec = SimpleNamespace(params=params)
        self._markers = set(markers)
        self._skip_reason = skip_reason

    def get_closest_marker(self, name):
        return object() if name in self._markers else None

    def iter_markers(self, name):
        if name == "skipif" and self._skip_reason is not None:
            yield SimpleNamespace(kwargs={"reason": self._skip_reason})


@pytest.mark.parametrize(
    "item, reason",
    [
        (FakeItem("test_wmma[float16]", params={"dtype": torch.float16}, markers={"cuda"}), "cuda marker"),
        (FakeItem("test_soft_warp[cuda]", params={"device": "cuda"}), "cuda parameter"),
        (FakeItem("test_soft_warp[cuda-float32]", params={"device": torch.device("cuda"), "dtype": "float32"}),
         "cuda parameter"),
        (FakeItem("test_half_banks_on_cuda[cpu]", params={"device": torch.device("cpu")}), None),
        (FakeItem("test_cuda_matches_cpu"), "name"),
        (FakeItem("test_mixed_devices_rejected", skip_reason="needs a GPU"), "skip reason"),
        (FakeItem("test_training_converges"), None),
        (FakeItem("test_soft_warp[cpu]", params={"device": "cpu"}), None),
        (FakeItem("test_reason[cuda marker]", params={"why": "cuda marker"}), None),  # a string, not a device
        (FakeItem("test_on[cuda:1]", params={"device": "cuda:1"}), "cuda parameter"),
    ],
)
def test_selection_rule(item, reason):
    assert gpu_check_select.cuda_reason(item) == reason


def test_sanitizer_summaries_are_counted():
    assert gpu_check.sanitizer_parser_self_test() == {"status": "ok", "problems": []}
    racecheck = gpu_check.parse_sanitizer(
        "racecheck", "========= RACECHECK SUMMARY: 4 hazards displayed (3 errors, 1 warning)\n")
    assert (racecheck["errors"], racecheck["warnings"]) == (3, 1)
    # A tool that prints only the generic line is still counted; no summary at all is None, never 0.
    assert gpu_check.parse_sanitizer("racecheck", "========= ERROR SUMMARY: 7 errors\n")["errors"] == 7
    assert gpu_check.parse_sanitizer("memcheck", "Traceback (most recent call last):\n")["errors"] is None
    assert "note" in gpu_check.parse_sanitizer("memcheck", "========= Error: Device not supported\n")


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.test_cmalign" name="test_soft_warp[cuda]">
  <properties><property name="gpu_check" value="cuda parameter"/></properties></testcase>
<testcase classname="tests.test_cmalign" name="test_wmma[bfloat16]">
  <properties><property name="gpu_check" value="cuda marker"/></properties>
  <failure message="AssertionError: max error 3e-2 &gt; 1e-2">trace</failure></testcase>
<testcase classname="tests.test_memory" name="test_update[cuda]">
  <properties><property name="gpu_check" value="cuda parameter"/></properties>
  <skipped type="pytest.skip" message="needs a CUDA device"/></testcase>
<testcase classname="tests.test_metrics" name="test_cuda_matches_cpu">
  <properties><property name="gpu_check" value="name"/></properties></testcase>
</testsuite></testsuites>
"""


def test_junit_summary(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    summary = gpu_check.summarise_junit(str(path))
    assert {k: summary[k] for k in ("total", "passed", "failed", "errors", "skipped")} == dict(
        total=4, passed=2, failed=1, errors=0, skipped=1)
    assert summary["cuda_ran"] == 2  # the cuda-parameter pass and the cuda-marker failure, not the skip or name
    assert summary["failures"] == ["tests.test_cmalign::test_wmma[bfloat16]: AssertionError: max error 3e-2 > 1e-2"]
    assert summary["skip_reasons"] == {"needs a CUDA device": 1}
    assert gpu_check.summarise_junit(str(tmp_path / "missing.xml"))["total"] == 0


def test_schema_problems_name_the_key():
    schema = {"a": int, "b": {"c": str, "d": (int, type(None))}}
    assert gpu_check.schema_problems({"a": 1, "b": {"c": "x", "d": None}}, schema) == []
    problems = gpu_check.schema_problems({"a": True, "b": {"d": "3"}}, schema)
    assert problems == ["a: expected a number, got a bool", "b.c: missing",
                        "b.d: expected (<class 'int'>, <class 'NoneType'>), got str"]
    step = {"steps": {"build": {"status": "done", "seconds": 1.0}}}
    assert gpu_check.schema_problems(step, {"steps": {"build": {"status": str, "seconds": gpu_check.NUMBER}}}) == [
        "steps.build.status: expected one of ('ok', 'failed', 'timed_out', 'skipped'), got 'done'"]


def test_output_limits_of_a_lent_machine(tmp_path):
    for i in range(gpu_check.MAX_FILES):
        (tmp_path / f"f{i}.json").write_text("{}")
    assert gpu_check.output_problems(str(tmp_path)) == []
    (tmp_path / "one too many.json").write_text("{}")
    problems = gpu_check.output_problems(str(tmp_path))
    assert any("9 files" in p for p in problems) and any("name has characters" in p for p in problems)


def test_a_step_past_its_deadline_is_killed_and_recorded(tmp_path):
    start = time.monotonic()
    job = gpu_check.Job("sleeper", [sys.executable, "-c", "import time; print('started', flush=True); "
                                    "time.sleep(60)"], 1.0, str(tmp_path))
    record = job.wait()
    assert record["status"] == "timed_out" and time.monotonic() - start < 20
    failed = gpu_check.Job("failer", [sys.executable, "-c", "raise SystemExit(3)"], 30.0, str(tmp_path)).wait()
    assert (failed["status"], failed["rc"]) == ("failed", 3)


def test_driver_covers_every_variant():
    import gpu_check_driver as driver

    calls = driver.plan(torch.device("cuda"))
    soft_warp = {(c["dtype"], c["env"][driver.TENSOR_CORES_ENV], c["env"][driver.MAX_ROWS_ENV])
                 for c in calls if c["op"] == "soft_warp"}
    assert {(d, tc, rows) for d in ("float32", "float16", "bfloat16") for tc in "01" for rows in ("32", "8", "1")} \
        <= soft_warp
    updates = {(c["dtype"], c["mode"], c["normalize"]) for c in calls if c["op"] == "memory_update_"}
    assert len(updates) == 4 * 3 * 2
    assert {c["op"] for c in calls} == set(driver.CASES)


@pytest.mark.skipif(not __import__("reid_kernels").extension_available(), reason="reid_kernels._C not built")
def test_driver_call_matches_the_reference_and_restores_the_environment():
    import gpu_check_driver as driver

    before = os.environ.get(driver.MAX_ROWS_ENV)
    call = dict(op="soft_warp", dtype="float32", env={driver.TENSOR_CORES_ENV: "1", driver.MAX_ROWS_ENV: "8"})
    record = driver.run_call(call, torch.device("cpu"), seed=0, with_reference=True)
    assert record["ok"] and record["finite"], record
    # float32 against float64: measured 1.2e-6 relative at these sizes
    assert max(record[name]["rel_norm"] for name in ("out", "grad_query", "grad_key", "grad_value")) < 1e-5
    assert os.environ.get(driver.MAX_ROWS_ENV) == before
