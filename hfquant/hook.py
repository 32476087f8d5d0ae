"""``hfquant install-hook``: let tools that never ``import hfquant`` (lm-eval, ``pipeline``, scripts) load its checkpoints.

transformers looks quantization methods up in its own table and has no plugin entry point. The hook is
the standard start-up mechanism of Python instead: a ``.pth`` file in site-packages whose one line
imports the tiny, standard-library-only module ``_hfquant_hook``, which imports hfquant only when
``from_pretrained`` meets a config declaring ``quant_method="hfquant"``. Opt-in, per environment, and
undone by ``hfquant install-hook --remove``. hfquant writes and removes only a file it wrote itself.
"""

from __future__ import annotations

import os
import sysconfig
import tempfile
from pathlib import Path

PTH_NAME = "hfquant-hook.pth"
PTH_LINE = "import _hfquant_hook  # written by `hfquant install-hook`; undo: `hfquant install-hook --remove`\n"


def default_site_dir() -> Path:
    """This environment's site-packages (where pip installed hfquant)."""
    return Path(sysconfig.get_paths()["purelib"])


def _is_ours(path: Path) -> bool:
    return path.read_text(encoding="utf-8") == PTH_LINE


def install_hook(site_dir: str | os.PathLike | None = None) -> Path:
    """Write ``hfquant-hook.pth`` into ``site_dir`` (default: this environment's site-packages); returns its path."""
    folder = Path(site_dir) if site_dir is not None else default_site_dir()
    if not folder.is_dir():
        raise ValueError(f"site_dir={str(folder)!r} is not allowed: it is not an existing folder")
    target = folder / PTH_NAME
    if target.exists() and not _is_ours(target):
        raise ValueError(f"{target} exists and was not written by hfquant; refusing to overwrite it")
    fd, staging = tempfile.mkstemp(prefix=".hfquant-hook-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(PTH_LINE)
        os.replace(staging, target)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return target


def remove_hook(site_dir: str | os.PathLike | None = None) -> Path | None:
    """Remove the hook written by :func:`install_hook`; returns its path, or None if there was none."""
    target = (Path(site_dir) if site_dir is not None else default_site_dir()) / PTH_NAME
    if not target.exists():
        return None
    if not _is_ours(target):
        raise ValueError(f"{target} was not written by hfquant; refusing to remove it")
    target.unlink()
    return target
