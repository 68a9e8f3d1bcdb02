"""``python -m iserve.gateway``: run the OpenAI-compatible HTTP API."""

from iserve.runtime import service_main

from .config import parse
from .service import GatewayService


async def build(cfg, nc):
    return GatewayService(cfg, nc)


def main(argv: list[str] | None = None) -> None:
    service_main("gateway", parse, build, argv)


if __name__ == "__main__":
    main()
