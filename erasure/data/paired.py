"""Forget and retain sets: prompts, with images where the method needs them.

A set is read from a `datasets` image folder (a folder with `metadata.jsonl` or `metadata.csv` whose
`file_name` column names the images), a parquet file or folder of them, or a hub dataset id. Image
bytes are kept undecoded until the run decodes them once (latents are cached, see trainer), so a
file that will not decode is reported by name.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from erasure.errors import DataError, one_line



@dataclass
class PromptImageSet:
    name: str  # "forget_data" / "retain_data", for messages
    source: str
    prompts: list[str]
    images: list[str | bytes] | None  # a path or encoded bytes per row; None for prompt-only sets
    sha256: str

    def __len__(self):
        return len(self.prompts)

    def describe(self) -> dict:
        return {"source": self.source, "rows": len(self), "sha256": self.sha256,
                "images": self.images is not None}


def _digest(prompts, images) -> str:
    h = hashlib.sha256()
    for i, prompt in enumerate(prompts):
        h.update(prompt.encode() + b"\0")
        if images is not None:
            item = images[i]
            h.update(item if isinstance(item, bytes) else Path(item).read_bytes())
    return h.hexdigest()


def read_jsonl(path: Path, name: str) -> list[dict]:
    """Rows of a JSON-lines file, each a JSON object; blank lines are skipped. `name` leads every error."""
    return [row for _, row in numbered_jsonl(path, name)]


def numbered_jsonl(path: Path, name: str) -> list[tuple[int, dict]]:
    """(line number, row) for each row of a JSON-lines file, as read_jsonl reads them."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{name}: cannot read {path} ({e.strerror or e})") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{name}: {path} line {number} is not JSON ({e})") from None
            if not isinstance(row, dict):
                raise DataError(f"{name}: {path} line {number} is a JSON {type(row).__name__}, expected an "
                                'object such as {"file_name": "0.png", "prompt": "…"}')
            rows.append((number, row))
    return rows


def _read_metadata(folder: Path, name: str) -> list[dict]:
    jsonl, table = folder / "metadata.jsonl", folder / "metadata.csv"
    if jsonl.is_file():
        return read_jsonl(jsonl, name)
    if table.is_file():
        return read_csv(table, name)
    parquet = sorted(folder.glob("*.parquet"))
    if parquet:
        return read_parquet(parquet, name)
    raise DataError(f"{name}: {folder} has no metadata.jsonl, metadata.csv or *.parquet; expected a "
                    "datasets image folder (metadata.jsonl with file_name and prompt columns)")


def read_csv(path: Path, name: str) -> list[dict]:
    """Rows of a UTF-8 CSV table with a header; `name` leads every error."""
    try:
        with Path(path).open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{name}: {path} is not a UTF-8 CSV table ({one_line(e)})") from None


def read_parquet(files: list[Path], name: str) -> list[dict]:
    """Rows of parquet files, in order; `name` leads every error."""
    import pyarrow.parquet as pq

    rows = []
    for file in files:
        try:
            rows.extend(pq.read_table(file).to_pylist())
        except Exception as e:  # pyarrow raises its own error types
            raise DataError(f"{name}: {file} cannot be read as parquet ({one_line(e)})") from None
    return rows


def _read_hub(dataset_id: str, name: str, image_column: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split="train")
    except Exception as e:
        raise DataError(f"{name}: {dataset_id!r} is not a local folder and could not be loaded from "
                        f"the hub ({type(e).__name__}: {e})") from None
    if image_column in ds.column_names:
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return ds.to_list()


def load_prompt_image_set(name: str, source: str, prompt_column: str = "prompt",
                          image_column: str = "image", need_images: bool = True) -> PromptImageSet:
    if source.startswith("tiny:"):
        from erasure.data.tiny_pairs import tiny_set

        source_path = tiny_set(source.removeprefix("tiny:"))
    elif source.startswith("world:"):
        from erasure.world.data import parse_source, world_pairs

        try:
            set_name, side = parse_source(source)
            source_path = world_pairs(set_name) / side
        except (ValueError, FileNotFoundError) as e:
            raise DataError(f"{name}: {e}") from None
    else:
        source_path = Path(source).expanduser()
    folder = None
    if source_path.is_dir():
        folder = source_path
        rows = _read_metadata(folder, name)
    elif source_path.is_file() and source_path.suffix == ".parquet":
        rows = read_parquet([source_path], name)
    elif source_path.exists():
        raise DataError(f"{name}: {source} is a file but not parquet; give a folder with "
                        "metadata.jsonl or a .parquet file")
    else:
        rows = _read_hub(source, name, image_column)
    where = str(folder / "metadata.jsonl") if folder else source
    if not rows:
        raise DataError(f"{name}: {where} has no rows")
    if prompt_column not in rows[0]:
        raise DataError(f"{name}: {where} has no prompt column {prompt_column!r} (columns: "
                        f"{', '.join(rows[0])}); set prompt_column to the one holding the prompts")
    prompts = []
    for i, row in enumerate(rows):
        prompt = row.get(prompt_column)
        if not isinstance(prompt, str):
            raise DataError(f"{name}: {where} row {i}: {prompt_column} is {prompt!r}, expected text")
        prompts.append(prompt)
    images = None
    if need_images:
        images = [_image_ref(row, i, folder, image_column, name, where) for i, row in enumerate(rows)]
    return PromptImageSet(name, source, prompts, images, _digest(prompts, images))


def _image_ref(row: dict, i: int, folder: Path | None, image_column: str, name: str, where: str):
    value = row.get("file_name", row.get(image_column)) if folder else row.get(image_column)
    if isinstance(value, dict):  # parquet / datasets Image(decode=False): {"bytes", "path"}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str) or not value:
        raise DataError(f"{name}: {where} row {i} has no image (expected a file_name column, or an "
                        f"{image_column!r} column with image bytes); this method needs images")
    path = (folder / value) if folder else Path(value)
    if not path.is_file():
        raise DataError(f"{name}: {where} row {i}: image file {path} does not exist")
    return str(path)


def decode_image(ref: str | bytes, resolution: int, name: str, index: int) -> torch.Tensor:
    """An image reference → a 3×R×R tensor in [-1, 1] (shorter side resized, centre crop)."""
    from PIL import Image, UnidentifiedImageError

    label = ref if isinstance(ref, str) else f"row {index} (inline bytes)"
    try:
        with Image.open(ref if isinstance(ref, str) else io.BytesIO(ref)) as image:
            image = image.convert("RGB")
            scale = resolution / min(image.size)
            size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
            image = image.resize(size, Image.BICUBIC)
            left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
            image = image.crop((left, top, left + resolution, top + resolution))
            array = np.asarray(image, dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{name}: image {label} cannot be decoded ({one_line(e)})") from None
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0
