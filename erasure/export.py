"""Writing the erased model: a complete diffusers pipeline in safetensors, plus its card (erasure.hub).

The export is staged beside OUT (in `.OUT.export-tmp`) and swapped in as a whole folder
(erasure.atomic), so that a crash during export leaves the earlier export complete, never a mix,
and never a folder that `DiffusionPipeline.from_pretrained` would take for complete when it is not.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from erasure.atomic import recover_folder, replace_folder, staging_beside, strict_json
from erasure.errors import OutputError
from erasure.hub import CARD_JSON, SINGLE_FILE, model_card

MODEL_INDEX = "model_index.json"


def versions(packages=("erasure", "torch", "diffusers", "transformers", "accelerate", "peft")) -> dict:
    """Installed versions of `packages`, and the erasure commit when run from a checkout."""
    found = {}
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5)
        # Outside a checkout git fails but still echoes "HEAD" on stdout: only a real hash counts.
        if done.returncode == 0 and len(done.stdout.strip()) == 40:
            found["erasure_commit"] = done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return found


# Pipeline arguments that live only in model_index.json and that save_pretrained does not write back:
# DiTPipeline takes its class-name map but does not register it (diffusers 0.42), so an export without
# it would lose get_label_ids.
INDEX_SETTINGS = ("id2label",)


def _restore_components(staging: Path, base_folder: Path, names: tuple[str, ...]) -> None:
    """Copy components the run did not load (SD3's T5 when training without it) from the base, and the
    base's INDEX_SETTINGS."""
    base_index = json.loads((base_folder / MODEL_INDEX).read_text())
    index = json.loads((staging / MODEL_INDEX).read_text())
    for name in names:
        entry = base_index.get(name)
        if entry and entry[0] and (base_folder / name).is_dir():
            shutil.copytree(base_folder / name, staging / name, dirs_exist_ok=True)
            index[name] = entry
    for name in INDEX_SETTINGS:
        if name in base_index and name not in index:
            index[name] = base_index[name]
    (staging / MODEL_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def is_export(folder: Path) -> bool:
    """An earlier export of ours, or a run of ours that has checkpoints but has not exported yet."""
    return (folder / CARD_JSON).is_file() or (folder / "checkpoints").is_dir()


def check_output_dir(out: Path, model: str, overwrite: bool) -> None:
    """Before the first step: the export may only replace what is ours (or what the user said may go),
    never the base model, and the folder and its parent must be writable (the export is staged beside it)."""
    out = Path(out).expanduser()
    if recover_folder(out):
        print(f"output_dir: put back {out} (an earlier export interrupted mid-swap)")
    resolved = out.resolve()
    base = Path(model).expanduser()
    if base.exists() and (resolved == base.resolve() or resolved in base.resolve().parents):
        raise OutputError(f"output_dir: {str(out)!r} is (or holds) the base model {model!r}; the export would "
                          "replace it — choose another folder")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output_dir: {str(out)!r} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not is_export(out) and not overwrite:
        example = sorted(p.name for p in out.iterdir())[:3]
        raise OutputError(f"output_dir: {str(out)!r} is not empty and is not an erasure export (it holds "
                          f"{', '.join(example)}…); choose a new folder, or pass --overwrite true to replace "
                          "it as a whole")
    # Nothing is made here: a run refused later (its model, its data) leaves no empty folder behind.
    # The nearest existing folder above the export and above its stage must take a file.
    nearest = [next(p for p in (folder, *folder.parents) if p.exists()) for folder in (out, out.parent)]
    try:
        for folder in dict.fromkeys(nearest):
            with tempfile.TemporaryFile(dir=folder):
                pass
    except OSError as e:
        raise OutputError(f"output_dir: cannot write in {str(out)!r} or beside it ({e.strerror or e})") from None


def export_pipeline(pipe, out_dir: Path, base_folder: Path, card: dict,
                    lora_state_dict: dict | None = None, save_lora=None, carry: tuple[str, ...] = (),
                    single_file: dict | None = None) -> Path:
    """Write the whole export beside `out_dir`, then swap it in as one folder: a crash at any moment
    leaves the complete old export or the complete new one, and nothing of an earlier run (a stale
    LoRA adapter, say) survives in the new one. `carry` names entries of the old folder that belong
    to this run (its checkpoints, its logs) and move into the new one. `single_file` (the backbone's
    single_file_state_dict) is written as SINGLE_FILE, inside the folder that is swapped in."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = staging_beside(out, "export")
    pipe.save_pretrained(staging, safe_serialization=True)
    _restore_components(staging, base_folder, ("text_encoder_3", "tokenizer_3"))
    if lora_state_dict is not None:
        save_lora(staging, lora_state_dict)
    if single_file is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in single_file.items()}, staging / SINGLE_FILE,
                  metadata={"format": "pt"})
        card = {**card, "single_file": {"file": SINGLE_FILE, "pipeline": type(pipe).__name__}}
    card = {**card, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions()}
    (staging / CARD_JSON).write_text(strict_json(card, indent=2, default=str))
    # the card reads the record as it is stored (JSON), so that a later `erasure push` renders the same card
    (staging / "README.md").write_text(str(model_card(json.loads((staging / CARD_JSON).read_text()))))
    for name in carry:
        if (out / name).exists():
            (out / name).rename(staging / name)
    replace_folder(staging, out)
    return out
