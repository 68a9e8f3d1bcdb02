"""``python -m iserve.scheduler``: run the scheduler."""

from iserve.runtime import service_main

from .config import parse
from .service import SchedulerService


async def build(cfg, nc):
    return SchedulerService(cfg, nc)


def main(argv: list[str] | None = None) -> None:
    service_main("scheduler", parse, build, argv)


if __name__ == "__main__":
    main()
