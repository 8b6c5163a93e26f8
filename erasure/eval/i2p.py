"""The I2P benchmark (Schramowski et al. 2023, `AIML-TUDA/i2p`, file i2p_benchmark.csv).

4,703 rows with prompt, categories, per-category percentages and the seed / guidance / size SD was
evaluated with; the nudity subset (nudity_percentage > 0) has 854 rows. ESD-style copies rename
sd_seed → evaluation_seed and sd_guidance_scale → evaluation_guidance; both spellings are read.
Some prompts are empty: they are skipped and counted.
"""

from __future__ import annotations

import math
from pathlib import Path

from erasure.data.paired import read_csv, read_parquet
from erasure.errors import DataError

RENAMED = {"evaluation_seed": "sd_seed", "evaluation_guidance": "sd_guidance_scale"}
FILTERS = {"nudity": lambda row: _number(row.get("nudity_percentage")) > 0, "all": lambda row: True}


def _number(value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return 0.0 if math.isnan(number) else number


def _setting(row: dict, column: str, index: int, source: str):
    """A row's seed (an integer in [0, 2**63)) or guidance (a finite number ≥ 0); None when the cell is
    empty. Anything else is an error naming the row: a NaN seed silently becoming seed 0, or an
    infinite guidance rendering black images, would change what the benchmark measures."""
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if column == "sd_seed":
        if math.isfinite(number) and number.is_integer() and 0 <= number < 2**63:
            try:
                return int(value)  # exact for ints and integer text, where a float would round
            except (TypeError, ValueError):
                return int(number)  # "1e3", 1000.0
        raise DataError(f"i2p: {source} row {index}: {column} {value!r} is not a seed (an integer in [0, 2**63)); "
                        "fix the row or set the suite's prompts.seed to a number")
    if math.isfinite(number) and number >= 0:
        return number or None
    raise DataError(f"i2p: {source} row {index}: {column} {value!r} is not a guidance scale (a finite number ≥ 0); "
                    "fix the row or set the suite's prompts.guidance to a number")


def _rows(source: str) -> list[dict]:
    path = Path(source).expanduser()
    if path.suffix == ".csv" and path.is_file():
        return read_csv(path, "i2p")
    if path.suffix == ".parquet" and path.is_file():
        return read_parquet([path], "i2p")
    if path.exists():
        raise DataError(f"i2p: {source} is neither a .csv nor a .parquet file")
    import datasets

    try:
        return datasets.load_dataset(source, split="train").to_list()
    except Exception as e:
        raise DataError(f"i2p: {source!r} is not a local CSV/parquet file and could not be loaded from the hub "
                        f"({type(e).__name__}: {e})") from None


def load_i2p(source: str, subset: str = "nudity") -> tuple[list[dict], dict]:
    """Rows {prompt, seed, guidance, categories, row} of the subset, and counts (rows, kept, empty)."""
    if subset not in FILTERS:
        raise DataError(f"i2p: filter {subset!r} is not one of {', '.join(FILTERS)}")
    rows = [{RENAMED.get(k, k): v for k, v in row.items()} for row in _rows(source)]
    if not rows:
        raise DataError(f"i2p: {source} has no rows")
    missing = {"prompt", "nudity_percentage"} - set(rows[0]) if subset == "nudity" else {"prompt"} - set(rows[0])
    if missing:
        raise DataError(f"i2p: {source} lacks the column(s) {', '.join(sorted(missing))} (columns: {', '.join(rows[0])})")
    kept, empty = [], 0
    for index, row in enumerate(rows):
        if not FILTERS[subset](row):
            continue
        prompt = (row.get("prompt") or "").strip() if isinstance(row.get("prompt"), str) else ""
        if not prompt:
            empty += 1
            continue
        kept.append({"prompt": prompt, "row": index, "categories": row.get("categories"),
                     "seed": _setting(row, "sd_seed", index, source), "guidance": _setting(row, "sd_guidance_scale",
                                                                                         index, source)})
    return kept, {"rows": len(rows), "subset": subset, "kept": len(kept), "empty_prompts_skipped": empty}
