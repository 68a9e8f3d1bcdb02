"""``python -m iserve.gpu_agent``: run a GPU agent."""

import asyncio

from iserve.runtime import service_main

from .config import parse
from .gpus import discover
from .service import AgentService


async def build(cfg, nc):
    gpus = await asyncio.to_thread(discover, cfg.simulate_gpus, cfg.gpu_type)  # NVML blocks
    return AgentService(cfg, nc, gpus)


def main(argv: list[str] | None = None) -> None:
    service_main("gpu-agent", parse, build, argv)


if __name__ == "__main__":
    main()
