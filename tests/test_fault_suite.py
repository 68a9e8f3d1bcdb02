"""The fault suite's short variant through the real stack (``bench/fault_suite.py``): under steady load,
``kill -9`` of the worker, the scheduler, the nats-server and the deployer loses no request (each one
completes or ends with a coded error) and the stack serves again within seconds. The full variant,
every fault and the hostile inputs, is opt-in: ``python bench/fault_suite.py --out OUT``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parent.parent
SERVE_AGAIN_S = 30.0


def _suite():
    spec = importlib.util.spec_from_file_location("fault_suite", ROOT / "bench" / "fault_suite.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fault_suite"] = mod  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(mod)
    return mod


async def test_no_request_is_lost_when_parts_of_the_stack_are_killed(tmp_path):
    suite = _suite()
    faults = suite.QUICK_FAULTS
    cfg = suite.SuiteConfig(
        out=tmp_path / "out",
        faults=",".join(faults),
        loops=2,
        warmup_s=1.0,
        settle_s=1.0,
        recover_timeout_s=SERVE_AGAIN_S,
        hostile=False,
    )
    result = await suite.run_suite(cfg, say=lambda line: None)
    print("\n" + suite.write(result, cfg.out))
    rows = {r["fault"]: r for r in result["faults"]}
    assert list(rows) == ["baseline", *faults], result["faults"]
    assert not result["stack_failed"]
    assert rows["baseline"]["completed"] > 0 and not rows["baseline"]["errors"], rows["baseline"]
    for fault in faults:
        r = rows[fault]
        assert r["lost"] == 0, r
        assert r["restarted"], r
        assert r["serve_again_s"] is not None and r["serve_again_s"] < SERVE_AGAIN_S, r
    assert set(rows["worker"]["errors"]) <= {"worker_died", "not_ready", "unavailable"}, rows["worker"]
    assert set(rows["scheduler"]["errors"]) <= {"unavailable", "timeout"}, rows["scheduler"]
    assert not rows["deployer"]["errors"], rows["deployer"]  # serving does not need the deployer
