"""``python -m iserve.deployer``: run the deployer."""

from iserve.runtime import service_main

from .config import parse
from .service import DeployerService


async def build(cfg, nc):
    return DeployerService(cfg, nc)


def main(argv: list[str] | None = None) -> None:
    service_main("deployer", parse, build, argv)


if __name__ == "__main__":
    main()
