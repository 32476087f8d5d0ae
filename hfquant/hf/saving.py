"""Saving quantized models: atomic folders that never replace what hfquant did not write, and a model card."""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from hfquant.cards import render_card, write_card
from hfquant.evaluation.results import EvalReport
from hfquant.hf.config import QUANT_METHOD
from hfquant.plan import ResolvedPlan
from hfquant.stats import storage_stats
from hfquant.validation import require_bool

logger = logging.getLogger(__name__)


def card_for(model: PreTrainedModel, folder: str | Path, report: EvalReport | None = None) -> Any:
    """The model card of a quantized ``model`` that is (being) saved to ``folder``."""
    quant_config = model.config.quantization_config
    quant_dict = quant_config if isinstance(quant_config, dict) else quant_config.to_dict()
    return render_card(quant_dict, base_model=quant_dict.get("base_model"), model_name=Path(folder).name,
                       repo_or_path=str(folder), storage=storage_stats(model).to_dict(), report=report)


def _plan(model: PreTrainedModel) -> ResolvedPlan | None:
    quant_config = model.config.quantization_config
    plan = quant_config.get("plan") if isinstance(quant_config, dict) else quant_config.plan
    return ResolvedPlan.from_dict(plan) if isinstance(plan, dict) else plan


def save_pretrained_with_card(model: PreTrainedModel, save: Callable[..., Any], save_directory: str | os.PathLike,
                              *args: Any, **kwargs: Any) -> Any:
    """``save_pretrained`` that also writes ``README.md`` (unless the folder already has one)."""
    result = save(save_directory, *args, **kwargs)
    still_quantized = getattr(model.config, "quantization_config", None) is not None  # not after dequantize()
    if still_quantized and not (Path(save_directory) / "README.md").exists():
        write_card(card_for(model, save_directory), save_directory, _plan(model))
    return result


def save_quantized(model: PreTrainedModel, folder: str | Path, tokenizer: Any = None,
                   report: EvalReport | None = None, overwrite: bool = False,
                   model_path: str | os.PathLike | None = None) -> Path:
    """Save weights, config, tokenizer and model card into ``folder`` atomically.

    :func:`check_output_folder` runs first (``model_path`` defaults to ``model.name_or_path``): a
    non-empty ``folder`` that is not an hfquant checkpoint needs ``overwrite=True``, and ``folder``
    may not be, contain or lie inside the source model folder. Everything is written to a staging
    folder next to ``folder`` and renamed into place; an existing ``folder`` is renamed aside first
    and deleted only once the new one is in place, so at every instant a complete checkpoint exists
    at ``folder`` or, for the moment between the two renames, aside as ``.NAME.old-*``, which the
    next call restores if the process died there.
    """
    require_bool("overwrite", overwrite)

    def fill(checkpoint: Path) -> None:
        type(model).save_pretrained(model, checkpoint)
        if tokenizer is not None:
            tokenizer.save_pretrained(checkpoint)
        write_card(card_for(model, Path(folder).expanduser().resolve(), report), checkpoint, _plan(model))

    return write_folder_atomically(folder, fill, model_path if model_path is not None else model.name_or_path,
                                   overwrite)


def write_folder_atomically(folder: str | Path, fill: Callable[[Path], None],
                            model_path: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Have ``fill(staging folder)`` write a folder's files, then swap the folder in as ``folder``.

    The safe-writing rules of :func:`save_quantized` (which calls it): :func:`check_output_folder`
    first, a staging folder next to ``folder`` holding hfquant's marker, renames into place, the
    previous folder deleted only once the new one is in place.
    """
    folder = check_output_folder(folder, model_path, overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-{os.getpid()}-", dir=folder.parent))
    _ACTIVE.add(staging)
    try:
        (staging / MARKER).write_text(json.dumps({"pid": os.getpid(), "host": _host(), "target": str(folder)}))
        checkpoint = staging / _CHECKPOINT
        checkpoint.mkdir()
        fill(checkpoint)
        _normal_permissions(checkpoint)
        _install(checkpoint, folder, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        _ACTIVE.discard(staging)
    return folder


MARKER = ".hfquant-staging"  # written into every staging folder; only folders holding it are ever cleaned up
_CHECKPOINT = "checkpoint"  # the new checkpoint inside the staging folder
_OLD = "old"  # the replaced checkpoint, moved into the staging folder to be deleted with it
_ACTIVE: set[Path] = set()  # staging / old folders of saves running in this process


EXPORT_REPORT = "hfquant-export.json"  # written into every folder `hfquant export` makes


def is_hfquant_output(folder: str | os.PathLike) -> bool:
    """Whether hfquant wrote ``folder``: an hfquant checkpoint, or an export (it holds :data:`EXPORT_REPORT`)."""
    return is_hfquant_checkpoint(folder) or (Path(folder) / EXPORT_REPORT).is_file()


def is_hfquant_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether ``folder/config.json`` has ``quantization_config.quant_method == "hfquant"``."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD


def check_output_folder(out: str | os.PathLike, model_path: str | os.PathLike | None = None,
                        overwrite: bool = False) -> Path:
    """The resolved ``out`` if a checkpoint may be saved there; raises otherwise, before any work.

    First finishes or undoes an earlier save to ``out`` that was killed (see
    :func:`recover_output_folder`). Then refuses (``ValueError``) ``out`` equal to, inside or
    containing the local model folder ``model_path`` (a Hub id is not checked), ``out`` holding the
    current working directory, and a non-empty ``out`` that is not an hfquant checkpoint unless
    ``overwrite``; ``NotADirectoryError`` when ``out`` or a parent is a file; ``PermissionError``
    when its parent cannot be written.
    """
    require_bool("overwrite", overwrite)
    given = str(out)
    out = Path(out).expanduser().resolve()
    recover_output_folder(out)
    name = f"OUT={given!r}"
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{name} is a file, not a folder; choose a folder path")
    if model_path is not None and Path(model_path).expanduser().is_dir():
        model = Path(model_path).expanduser().resolve()
        if out == model:
            raise ValueError(f"{name} is the MODEL folder {str(model)!r}; saving there would overwrite the "
                             "model being quantized; choose another folder")
        if model in out.parents:
            raise ValueError(f"{name} is inside the MODEL folder {str(model)!r}; choose a folder outside it")
        if out in model.parents:
            raise ValueError(f"the MODEL folder {str(model)!r} is inside {name}; replacing {name} would "
                             "delete the model; choose another folder")
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise ValueError(f"{name} is the current folder {str(cwd)!r} or holds it; OUT is replaced as a whole, "
                         "which would leave this process and shell in a deleted folder; choose a new subfolder "
                         "(e.g. ./quantized)")
    if out.is_dir() and any(out.iterdir()) and not is_hfquant_output(out) and not overwrite:
        raise _not_a_checkpoint(name)
    _check_writable(out, name)
    return out


def _not_a_checkpoint(name: str) -> ValueError:
    return ValueError(f"{name} is a non-empty folder and not an hfquant checkpoint (no config.json with "
                      f"quantization_config.quant_method={QUANT_METHOD!r}); refusing to replace it: pass "
                      "--overwrite (API: overwrite=True) to replace it, or choose an empty or new folder")


def _check_writable(out: Path, name: str) -> None:
    """Probe (create and remove an empty staging-named folder) the nearest existing ancestor of ``out``."""
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"{name} cannot be created: {str(ancestor)!r} is a file, not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=ancestor)
    except OSError as error:
        raise PermissionError(f"{name}: cannot write in {str(ancestor)!r} ({error.strerror or error}); "
                              "choose a folder you can write to") from error
    os.rmdir(probe)


def recover_output_folder(out: str | os.PathLike) -> None:
    """Finish or undo earlier saves to ``out`` whose process died (SIGKILL, power loss).

    * a ``.NAME.old-*`` folder (the previous checkpoint, renamed aside) next to a missing ``out`` is
      renamed back to ``out``; next to an existing ``out`` it is deleted if it is an hfquant
      checkpoint (the swap had finished) and otherwise only reported;
    * ``.NAME.tmp-*`` staging folders that hold hfquant's marker file are deleted.

    Only folders of processes that are no longer running (on this host) are touched; each action is
    logged as a warning.
    """
    out = Path(out)
    parent = out.parent
    if not parent.is_dir():
        return
    name = re.escape(out.name)
    old_pattern = re.compile(rf"\.{name}\.old-(\d+)(?:-\w+)?")
    staging_pattern = re.compile(rf"\.{name}\.tmp-(\d+)-\w+")
    olds, stagings = [], []
    for entry in sorted(parent.iterdir()):
        if not entry.is_dir() or entry.is_symlink():
            continue
        if (match := old_pattern.fullmatch(entry.name)) and _stale(entry, int(match[1])):
            olds.append(entry)
        elif (match := staging_pattern.fullmatch(entry.name)) and (entry / MARKER).is_file():
            marker = _read_marker(entry / MARKER)
            if marker.get("host") == _host() and _stale(entry, int(match[1])):
                stagings.append(entry)
    if olds and not os.path.lexists(out):
        if len(olds) == 1:
            os.replace(olds[0], out)
            logger.warning("hfquant: restored %s from %s (an earlier save was killed while replacing it)",
                           out, olds[0])
        else:
            logger.warning("hfquant: %s is missing and several earlier versions were left aside by killed saves: "
                           "%s; none restored: rename the one you want back to %s", out,
                           ", ".join(map(str, olds)), out.name)
        olds = []
    for old in olds:  # ``out`` exists: the swap had finished, only the deletion of the old one had not
        if is_hfquant_output(old):
            shutil.rmtree(old)
            logger.warning("hfquant: deleted %s, the previous checkpoint at %s that a killed save had replaced",
                           old, out)
        else:
            logger.warning("hfquant: %s holds what was at %s before a killed save replaced it; left in place, "
                           "delete it yourself once you do not need it", old, out)
    for staging in stagings:
        shutil.rmtree(staging)
        logger.warning("hfquant: deleted %s, the staging folder of an earlier save to %s that was killed",
                       staging, out)


def _read_marker(path: Path) -> dict[str, Any]:
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _host() -> str:
    return socket.gethostname()


def _stale(folder: Path, pid: int) -> bool:
    """Whether the save that made ``folder`` (named with its process id) has ended."""
    if pid == os.getpid():
        return folder not in _ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _normal_permissions(folder: Path) -> None:
    """What ``mkdir``/``open`` would give: ``0o755``/``0o644`` less the umask (temp files are private)."""
    mask = _umask()
    folder.chmod(0o755 & ~mask)
    for path in folder.rglob("*"):
        path.chmod((0o755 if path.is_dir() else 0o644) & ~mask)


def _install(checkpoint: Path, target: Path, staging: Path) -> None:
    """Rename ``checkpoint`` to ``target``; an existing ``target`` goes aside first, then into ``staging``."""
    if not os.path.lexists(target):
        os.replace(checkpoint, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    _ACTIVE.add(old)
    try:
        os.replace(target, old)
        try:
            os.replace(checkpoint, target)
        except BaseException:
            try:
                os.replace(old, target)  # put the previous checkpoint back
            except OSError:
                logger.error("hfquant: could not put %s back to %s; rename it yourself", old, target)
            raise
        os.replace(old, staging / _OLD)  # deleted with the staging folder
    finally:
        _ACTIVE.discard(old)
