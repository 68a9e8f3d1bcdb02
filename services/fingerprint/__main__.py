"""``python -m iserve.fingerprint``: run the fingerprint service."""

from iserve.gpu_agent.engine.capabilities import CAPABILITIES
from iserve.runtime import service_main

from .config import parse
from .service import FingerprintService


async def build(cfg, nc):
    return FingerprintService(cfg, nc, CAPABILITIES)  # what the workers can run decides what is profiled


def main(argv: list[str] | None = None) -> None:
    service_main("fingerprint", parse, build, argv)


if __name__ == "__main__":
    main()
