"""``python -m iserve.loadgen``: replay an Azure trace against a running iServe (see ``replay.py``).

Exit status: 0 when the replay finished, 130 when it was stopped with Ctrl-C (the run directory
then holds what was collected), 2 when iServe refused something (unknown model, no deployment could
be made, ...), 1 on other errors such as a missing trace file.
"""

from __future__ import annotations

import asyncio
import sys

from rich.console import Console
from rich.markup import escape

from iserve import errors
from iserve.runtime import install_signal_handlers

from .config import LoadgenConfig, parse
from .replay import dry_run, run, summary_table


async def amain(cfg: LoadgenConfig, console: Console) -> int:
    stop = asyncio.Event()
    install_signal_handlers(stop)
    result = await run(cfg, stop=stop)  # progress and messages on standard error
    if result.summary is not None:
        state = "stopped early" if result.interrupted else "done"
        console.print(
            summary_table(
                result.summary, title=f"{state}: {result.summary.count} of {result.planned} requests recorded"
            )
        )
    else:
        console.print(f"no request was sent ({'stopped early' if result.interrupted else 'nothing to replay'})")
    console.print(f"run directory: {result.path}", soft_wrap=True, markup=False, highlight=False)
    return 130 if result.interrupted else 0


def run_cli(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (flags and ISERVE_* twins), run, and return the exit status."""
    cfg = parse(argv)
    console = Console()
    err = Console(stderr=True)
    if cfg.dry_run:
        dry_run(cfg, console)
        return 0
    from iserve import logs

    logs.configure("loadgen", level=cfg.log_level, json=cfg.log_json)
    try:
        try:
            import uvloop

            return uvloop.run(amain(cfg, console))
        except ImportError:  # pragma: no cover - uvloop is a dependency
            return asyncio.run(amain(cfg, console))
    except errors.IServeError as e:
        err.print(f"[red]error[/] {escape(str(e))}")
        return 2
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError) as e:
        err.print(f"[red]error[/] {escape(str(e))}")
        return 1


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m iserve.loadgen`` and ``iserve loadgen``: exits with ``run_cli``'s status."""
    sys.exit(run_cli(argv))


if __name__ == "__main__":
    main()
