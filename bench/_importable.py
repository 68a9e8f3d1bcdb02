"""Make ``iserve`` importable from this checkout when it is not installed (the GPU machine runs the
bench scripts from an uninstalled copy of the tree), for this process AND the processes it starts
(``iserve up``'s services run as ``python -m iserve.<service>``, the GPU agent's workers likewise).

pyproject.toml maps the package ``iserve`` to ``shared/`` and its subpackages to other folders
(``package_dirs``). ``ensure_importable`` builds that layout as a folder of symbolic links in a
temporary directory (``<tmp>/iserve/`` holding links to ``shared/``'s files and to the subpackage
folders), puts it first on ``sys.path`` and on ``PYTHONPATH``, and imports ``probe``. Where
``iserve`` is already importable (an installed or editable checkout) nothing is changed.

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _importable import ensure_importable
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def package_dirs(root: Path = ROOT) -> dict[str, str]:
    """pyproject.toml's ``[tool.setuptools.package-dir]``: package name -> folder."""
    with open(root / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["tool"]["setuptools"]["package-dir"])


def make_shim(dest: str | Path | None = None, root: Path = ROOT) -> Path:
    """A folder in which ``iserve`` is the checkout's layout, made of symbolic links; returns it
    (put it on ``sys.path`` / ``PYTHONPATH``)."""
    base = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="iserve-shim-"))
    pkg = base / "iserve"
    pkg.mkdir(parents=True, exist_ok=True)
    dirs = package_dirs(root)
    subs = {name.split(".")[1]: rel for name, rel in dirs.items() if name.count(".") == 1}
    for entry in (root / dirs["iserve"]).iterdir():
        if entry.name == "__pycache__" or entry.name in subs:
            continue
        link = pkg / entry.name
        if not link.exists():
            link.symlink_to(entry)
    for name, rel in subs.items():  # iserve.gpu_agent.engine lies inside services/gpu-agent already
        link = pkg / name
        if not link.exists():
            link.symlink_to(root / rel, target_is_directory=True)
    return base


def ensure_importable(probe: str = "iserve.fingerprint.validate", *, script: str = "this script") -> Path | None:
    """Import ``probe``; when ``iserve`` is not importable, make a shim (``make_shim``), put it on
    ``sys.path`` and ``PYTHONPATH`` (children inherit it) and import again. Returns the shim or None.
    A missing third-party dependency stops with its name."""
    try:
        importlib.import_module(probe)
        return None
    except ImportError as e:
        missing = getattr(e, "name", "") or ""
        if missing and not missing.startswith("iserve"):
            raise SystemExit(
                f"{script} needs the Python package {missing!r} (pip install it, or carry its wheel): {e}"
            ) from None
    for name in [m for m in sys.modules if m == "iserve" or m.startswith("iserve.")]:
        del sys.modules[name]  # a half-imported attempt
    shim = make_shim()
    sys.path.insert(0, str(shim))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(shim), *filter(None, [os.environ.get("PYTHONPATH", "")])])
    importlib.invalidate_caches()
    try:
        importlib.import_module(probe)
    except ImportError as e:
        raise SystemExit(f"{script}: cannot import {probe} from {ROOT}: {e}") from None
    return shim
