"""The fingerprint service, its entry point and ``iserve validate``'s planning side import no torch:
they read the engine's ``CAPABILITIES`` from a module that imports none."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "modules",
    [
        "iserve.fingerprint.service, iserve.fingerprint.__main__",
        "iserve.fingerprint.validate",
        "iserve.gpu_agent.engine, iserve.gpu_agent.engine.capabilities",
        "iserve.loadgen.simulator, iserve.loadgen.replica, iserve.gpu_agent.engine.batch_plan",
    ],
)
def test_importing_imports_no_torch(modules):
    code = f"import sys, {modules}; assert 'torch' not in sys.modules, 'torch was imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_planning_side_of_validate_reads_capabilities_without_torch():
    code = (
        "import sys; from iserve.fingerprint import measure; "
        "from iserve.gpu_agent.engine.capabilities import CAPABILITIES; "
        "assert measure.engine_capabilities() == CAPABILITIES; assert 'torch' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
