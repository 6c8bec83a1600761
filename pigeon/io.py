"""Atomic file output and safe loading: nothing is ever half-written, nothing is unpickled."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pigeon.errors import CheckpointError, PigeonError


def write_error(path: str | Path, exc: OSError) -> PigeonError:
    """One line saying why ``path`` cannot be written (a file where a folder should be, permissions, …)."""
    path = Path(path)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return PigeonError(f"cannot write {path}: {parent} is a file, not a folder")
            break
    return PigeonError(f"cannot write {path}: {exc.strerror or exc}")


def ensure_folders(*folders: str | Path) -> None:
    """Create output folders up front: a stage with several outputs then fails before it replaces any."""
    for folder in map(Path, folders):
        if folder.exists() and not folder.is_dir():
            raise PigeonError(f"cannot write into {folder}: it is a file, not a folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(folder, exc) from exc


def _tmp_sibling(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o644)  # mkstemp makes 0600; outputs are ordinary readable files
    return Path(name)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    try:
        tmp = _tmp_sibling(path)
    except OSError as exc:
        raise write_error(path, exc) from exc
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # disk full, or a folder already at ``path``
        if path.is_dir():
            raise PigeonError(f"cannot write {path}: it is a folder") from exc
        raise write_error(path, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise PigeonError(f"{path}: file not found") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PigeonError(f"{path}: not valid JSON ({exc})") from exc


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` whole, on error it is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
    except OSError as exc:
        raise write_error(path, exc) from exc
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_tensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Save a flat dict of tensors as safetensors, atomically."""
    from safetensors.torch import save

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write_bytes(path, save(clean, metadata=metadata))


def load_tensors(path: str | Path, device: str = "cpu") -> dict:
    """Load safetensors only; a pickle, a truncated file or a foreign format is a CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:2] in (b"\x80\x02", b"\x80\x04", b"\x80\x05") or head[:2] == b"PK":
        raise CheckpointError(f"{path}: is a pickle/zip checkpoint; only safetensors are loaded")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({str(exc).splitlines()[0]})") from exc


def file_md5(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_hash(path: str | Path) -> str:
    """Content hash of a file or a folder (names + bytes), stable across machines."""
    path = Path(path)
    if path.is_file():
        return file_md5(path)
    digest = hashlib.md5()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(str(f.relative_to(path)).encode())
        digest.update(file_md5(f).encode())
    return digest.hexdigest()
