"""``iserve register`` shows each profiling job's step while it waits (plain lines off a terminal),
read from the model's record over a real nats-server with the real services."""

from __future__ import annotations

from test_services import Cluster, copy_model

from iserve import cli
from iserve.client import Client


async def test_register_prints_each_profiling_step(nats_server, tmp_path, tiny_model, capsys):
    async with Cluster(nats_server.url, tmp_path):
        model = copy_model(tiny_model, tmp_path / "tiny")
        a = cli.build_parser().parse_args(["register", str(model), "--nats-url", nats_server.url])
        assert await cli._register(a) == 0
        printed = capsys.readouterr()
        assert "profiled on sim-gpu" in printed.out
        lines = [line for line in printed.err.splitlines() if line.startswith("sim-gpu: ")]
        assert any("measuring" in line and "variants on a0/GPU" in line for line in lines), printed.err
        assert "done:" in lines[-1] and "configurations" in lines[-1]
        async with await Client.connect(nats_server.url) as c:
            rec = (await c.model("tiny")).record
        assert rec.profiling == {"sim-gpu": lines[-1].split(": ", 1)[1].rsplit(" (", 1)[0]}
