"""Work cut into shards of windows: each shard is made on its own, in any order, on any worker.

A shard of tensors is ``shard-XXXXX.safetensors`` + ``shard-XXXXX.json``, written in that order,
each atomically; the JSON (the run fingerprint, the shard's window ids and the tensors' md5) is
written last, so its presence with a matching checksum means the shard is complete. A stage keeps
the complete shards of the same fingerprint and redoes only the missing ones.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from pigeon.errors import DataError, PigeonError
from pigeon.io import file_md5, load_tensors, read_json, save_tensors, write_json

SHARD_NAME = re.compile(r"^shard-(\d{5})(?:\.|$)")


@dataclass
class ShardPlan:
    """Windows (in plan order) cut into shards of ``shard_size`` consecutive windows."""

    windows: pd.DataFrame
    shard_size: int

    @property
    def num_shards(self) -> int:
        return -(-len(self.windows) // self.shard_size)

    def start(self, index: int) -> int:
        """Plan position of the shard's first window."""
        return index * self.shard_size

    def shard(self, index: int) -> pd.DataFrame:
        if not 0 <= index < self.num_shards:
            raise DataError(f"shard {index}: the plan has shards 0..{self.num_shards - 1}")
        return self.windows.iloc[self.start(index) : self.start(index + 1)]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def shard_index(path: Path) -> int | None:
    """The index in a shard file's or folder's name; None for any other name."""
    match = SHARD_NAME.match(path.name)
    return int(match.group(1)) if match else None


def tensor_shard_files(folder: Path, index: int) -> tuple[Path, Path]:
    return folder / f"{shard_name(index)}.safetensors", folder / f"{shard_name(index)}.json"


def write_tensor_shard(folder: Path, index: int, window_ids: list[str], tensors: dict[str, torch.Tensor],
                       meta: dict) -> None:
    """Tensors first, then the JSON that marks the shard complete."""
    tensors_path, json_path = tensor_shard_files(folder, index)
    json_path.unlink(missing_ok=True)  # the shard is incomplete until its JSON is back
    save_tensors(tensors_path, tensors)
    write_json(json_path, {**meta, "shard": index, "window_ids": list(window_ids),
                           "md5": file_md5(tensors_path)})


def tensor_shard_complete(folder: Path, index: int, window_ids: list[str], fingerprint: str) -> bool:
    """True when the shard on disk was written whole by a run with the same fingerprint and windows."""
    tensors_path, json_path = tensor_shard_files(folder, index)
    try:
        meta = read_json(json_path)
    except PigeonError:  # missing or torn: make it again
        return False
    return (meta.get("fingerprint") == fingerprint and meta.get("window_ids") == list(window_ids)
            and tensors_path.is_file() and file_md5(tensors_path) == meta.get("md5"))


def read_tensor_shard(folder: Path, index: int) -> tuple[dict, dict[str, torch.Tensor]]:
    tensors_path, json_path = tensor_shard_files(folder, index)
    return read_json(json_path), load_tensors(tensors_path)


def drop_shards_beyond(count: int, *folders: Path) -> list[Path]:
    """Remove the shard files and folders numbered ``count`` or more (left by a larger earlier plan)."""
    dropped = []
    for folder in folders:
        for path in sorted(folder.glob("shard-*")):
            index = shard_index(path)
            if index is not None and index >= count:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                dropped.append(path)
    return dropped
