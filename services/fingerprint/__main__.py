"""``python -m iserve.fingerprint``: run the fingerprint service."""

from iserve.runtime import service_main

from .config import parse
from .service import FingerprintService


async def build(cfg, nc):
    from iserve.gpu_agent.engine import CAPABILITIES  # what the workers can run decides what is profiled

    return FingerprintService(cfg, nc, CAPABILITIES)


def main(argv: list[str] | None = None) -> None:
    service_main("fingerprint", parse, build, argv)


if __name__ == "__main__":
    main()
