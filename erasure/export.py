"""Writing the erased model: a complete diffusers pipeline in safetensors, plus an erasure card.

The export is staged in `OUT/.export-tmp` and moved into place component by component with
`model_index.json` last — and any earlier `model_index.json` removed first — so that a crash during
export never leaves a folder that `DiffusionPipeline.from_pretrained` would take for complete.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

MODEL_INDEX = "model_index.json"
CARD_JSON = "erasure.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


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


def _restore_components(staging: Path, base_folder: Path, names: tuple[str, ...]) -> None:
    """Copy components the run did not load (SD3's T5 when training without it) from the base."""
    base_index = json.loads((base_folder / MODEL_INDEX).read_text())
    index = json.loads((staging / MODEL_INDEX).read_text())
    for name in names:
        entry = base_index.get(name)
        if entry and entry[0] and (base_folder / name).is_dir():
            shutil.copytree(base_folder / name, staging / name, dirs_exist_ok=True)
            index[name] = entry
    (staging / MODEL_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def model_card(card: dict) -> str:
    config = card["config"]
    losses = ", ".join(f"{k} {v:.4f}" for k, v in card["final_losses"].items() if v is not None)
    data = "\n".join(f"| {name} | `{d['source']}` | {d['rows']} | `{d['sha256'][:16]}…` |"
                     for name, d in card["data"].items())
    monitor = card.get("run", {}).get("monitor")
    checked = ""
    if monitor and monitor["history"]:
        last = monitor["stopped"] or monitor["history"][-1]
        kept = "—" if last["retain"] is None else f"{last['retain']:.3f}"
        checked = (f"| {'stopped at erasure' if monitor['stopped'] else 'last check'} | step {last['step']}: "
                   f"erasure rate {last['erasure']:.3f}, retain score {kept} ({monitor['detector']}, "
                   f"{monitor['pairs']} held-out pairs) |\n")
    lora = (f"\nThe LoRA adapter alone is in `{LORA_WEIGHTS}`; apply it to the base model with "
            f"`pipe.load_lora_weights(\"{card['output_dir']}\")`.\n") if config["scope"] == "lora" else ""
    return f"""---
base_model: {card['base_model']}
library_name: diffusers
tags:
- erasure
- concept-erasure
- {config['method']}
---

# {config['concept'] or 'Concept'} erased from `{card['base_model']}` with {config['method'].upper()}

Trained with erasure {card['versions'].get('erasure', 'dev')}; the full recipe, data hashes and versions are in `{CARD_JSON}`.

| | |
|---|---|
| base model | `{card['base_model']}` ({card['family']}) |
| method | {config['method']} |
| scope | {config['scope']} |
| steps | {card['steps']} |
| batch size | {config['batch_size']} |
| learning rate | {config['learning_rate']} |
| final losses | {losses or '—'} |
{checked}
| set | source | rows | sha256 |
|---|---|---|---|
{data}

## Use

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("{card['output_dir']}")
```
{lora}
Erasure lowers the chance that the model draws the concept; it is not a guarantee. Evaluate it
(I2P / NudeNet, CLIP alignment) before you publish it.
"""


def export_pipeline(pipe, out_dir: Path, base_folder: Path, card: dict,
                    lora_state_dict: dict | None = None, save_lora=None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / ".export-tmp"
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, safe_serialization=True)
    _restore_components(staging, base_folder, ("text_encoder_3", "tokenizer_3"))
    if lora_state_dict is not None:
        save_lora(staging, lora_state_dict)
    card = {**card, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(), "output_dir": str(out)}
    (staging / CARD_JSON).write_text(json.dumps(card, indent=2, default=str) + "\n")
    (staging / "README.md").write_text(model_card(card))

    # Commit: the old index goes first, the new one last, everything else in between.
    (out / MODEL_INDEX).unlink(missing_ok=True)
    for item in sorted(staging.iterdir()):
        if item.name == MODEL_INDEX:
            continue
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        item.rename(target)
    (staging / MODEL_INDEX).rename(out / MODEL_INDEX)
    staging.rmdir()
    return out
