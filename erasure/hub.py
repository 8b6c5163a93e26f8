"""The model card of an export, and publishing an export on the Hugging Face Hub.

The card (README.md of the export) is built with huggingface_hub's `ModelCard` / `ModelCardData`, so
the Hub reads its metadata: the base model as its hub id, `library_name: diffusers`, tags for the
method and the model family. It names no path of the training machine: the base model appears as
its hub id (or as "a local model"), data sets by file name and hash. The full record of the run,
paths included, stays in `erasure.json` on the training machine; what goes to the Hub is a copy
whose absolute paths are cut to their last part (`public_record`).

The token is huggingface_hub's own: `HF_TOKEN` or a `huggingface-cli login`; erasure never reads,
logs or writes it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from erasure.errors import OutputError

CARD_JSON = "erasure.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
KOHYA_LORA = "lora_kohya.safetensors"  # the same adapter in kohya-ss's layout
KOHYA_FAMILIES = ("sd1", "sdxl")  # the UNet families whose LoRA exports write it (backbones.base.save_kohya_lora)
SINGLE_FILE = "single_file.safetensors"  # the whole pipeline in its original layout (erasure.single_file)
# What a run leaves beside the pipeline for the training machine only (erasure.trainer.RUN_FILES and
# the checkpoints): never uploaded.
NOT_PUBLISHED = ("checkpoints", "logs", "monitor")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
# The Hub's task of each family; a class-conditional model (DiT) has no task of its own there.
FAMILY_PIPELINE_TAG = {"sd1": "text-to-image", "sdxl": "text-to-image", "sd3": "text-to-image", "flux": "text-to-image", "ddpm": "unconditional-image-generation"}


def hub_base_model(model: str, depth: int = 3) -> str | None:
    """The hub id of the base model `model` names, or None when it has none we can know: a hub id
    itself; a folder in the Hub's cache (`…/models--ORG--NAME/snapshots/…`); an erasure export, whose
    own record names its base. `tiny:` and `world:` models are not on the Hub."""
    if not model or model.startswith(("tiny:", "world:")) or depth == 0:
        return None
    path = Path(model).expanduser()
    if not path.exists():
        return model if HUB_ID.match(model) else None
    for part in path.resolve().parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return "/".join(part.split("--")[1:])
    record = path / CARD_JSON
    if record.is_file():
        try:
            return hub_base_model(json.loads(record.read_text()).get("base_model", ""), depth - 1)
        except (OSError, ValueError, AttributeError):
            return None
    return None


def _is_local_path(text: str) -> bool:
    return text.startswith(("/", "~", "\\")) or bool(re.match(r"^[A-Za-z]:[\\/]", text))


def public_record(value):
    """`value` (the run's record) with every absolute or home-relative path cut to its last part, so
    that nothing of the training machine's folders leaves it; `output_dir` is dropped."""
    if isinstance(value, dict):
        return {k: public_record(v) for k, v in value.items() if k != "output_dir"}
    if isinstance(value, list):
        return [public_record(v) for v in value]
    if isinstance(value, str) and _is_local_path(value):
        return Path(value.replace("\\", "/")).name or value
    return value


def _report_section(report: dict) -> str:
    """The evaluation's protocol (without the machine's paths) and its tables, from a report.json."""
    from erasure.eval.report import tables

    p = report["protocol"]
    g = p["generation"]
    lines = ["## Evaluation", "",
             f"`erasure eval` with the suite `{p['suite']}` (sha256 `{p['suite_sha256'][:16]}…`): {g['steps']} "
             f"sampler steps, guidance {p['guidance']}, seeds {p['seeds']}, {g['images_per_prompt']} image(s) per "
             f"prompt; models {', '.join(m['name'] for m in report['models'])}."]
    lines += tables(report)
    return "\n".join(lines)


def model_card(record: dict, repo_id: str | None = None, report: dict | None = None):
    """The export's card as a huggingface_hub ModelCard: metadata for the Hub, then the run's table.
    `repo_id` (when publishing) goes into the usage example; `report` (a report.json) adds the
    evaluation's protocol and tables."""
    from huggingface_hub import ModelCard, ModelCardData

    config = record["config"]
    base = hub_base_model(record["base_model"])
    family = record["family"]
    method = config["method"]
    data = ModelCardData(
        base_model=base, library_name="diffusers",
        pipeline_tag=FAMILY_PIPELINE_TAG.get(family),
        tags=["erasure", "concept-erasure", "machine-unlearning", method, family]
        + (["lora"] if config["scope"] == "lora" else []))
    losses = ", ".join(f"{k} {v:.4f}" for k, v in record["final_losses"].items() if v is not None)
    base_text = f"`{base}`" if base else "a local model"
    rows = [("base model", f"{base_text} ({family})"), ("method", method), ("concept", config["concept"] or "—"),
            ("scope", config["scope"]), ("steps", record["steps"]), ("batch size", config["batch_size"]),
            ("learning rate", config["learning_rate"]), ("final losses", losses or "—")]
    monitor = record.get("run", {}).get("monitor")
    if monitor and monitor["history"]:
        last = monitor["stopped"] or monitor["history"][-1]
        kept = "—" if last["retain"] is None else f"{last['retain']:.3f}"
        rows.append(("stopped at erasure" if monitor["stopped"] else "last check",
                     f"step {last['step']}: erasure rate {last['erasure']:.3f}, retain score {kept} "
                     f"({monitor['detector']}, {monitor['pairs']} held-out pairs)"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    sets = "\n".join(f"| {name} | `{public_record(d['source'])}` | {d['rows']} | `{d['sha256'][:16]}…` |"
                     for name, d in record["data"].items())
    where = repo_id or "path/to/this/folder"
    lora = (f"\nThe LoRA adapter alone is in `{LORA_WEIGHTS}`; apply it to the base model with "
            f"`pipe.load_lora_weights(\"{where}\")`."
            + (f" The same adapter in kohya's layout, for A1111 and ComfyUI, is `{KOHYA_LORA}`."
               if family in KOHYA_FAMILIES else "") + "\n") if config["scope"] == "lora" else ""
    single, single_text = record.get("single_file"), ""
    if single:  # erasure.export wrote the whole pipeline in its original layout at the top level
        file = f"https://huggingface.co/{repo_id}/blob/main/{single['file']}" if repo_id else \
            f"{where}/{single['file']}"
        fused = " (the LoRA fused in)" if config["scope"] == "lora" else ""
        single_text = (f"\nThe whole pipeline{fused} is also one checkpoint in its original layout, "
                       f"`{single['file']}`, which A1111 and ComfyUI load; diffusers reads it with "
                       f"`{single['pipeline']}.from_single_file(\"{file}\", config=\"{where}\")`.\n")
    body = f"""
# {config['concept'] or 'A concept'} erased from {base_text} with {method.upper()}

Trained with erasure {record.get('versions', {}).get('erasure', 'dev')}; the recipe, data hashes and
package versions are in `{CARD_JSON}`.

| | |
|---|---|
{table}

| set | source | rows | sha256 |
|---|---|---|---|
{sets}

## Use

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("{where}")
```
{lora}{single_text}
{_report_section(report) + chr(10) if report else ''}
Erasure lowers the chance that the model draws the concept; it is not a guarantee. Evaluate it
(`erasure eval`: I2P / NudeNet, CLIP alignment) before you publish it.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def push_export(folder: str | Path, repo_id: str, private: bool = False, report: dict | None = None) -> str:
    """Publish an export on the Hub in one commit: the pipeline, the LoRA adapter if any, the card
    (with the evaluation when `report`, a report.json, is given) and the run's record without local paths.
    Checkpoints and logs stay behind. Returns the repo's URL."""
    from huggingface_hub import HfApi

    folder = Path(folder).expanduser()
    if not (folder / CARD_JSON).is_file():
        raise OutputError(f"{str(folder)!r} is not an erasure export (no {CARD_JSON}); push the output_dir "
                          "of `erasure train`")
    if not HUB_ID.match(repo_id or ""):
        raise OutputError(f"hub_model_id (--hub-model-id): {repo_id!r} is not a hub repo id; expected OWNER/NAME")
    try:
        record = json.loads((folder / CARD_JSON).read_text())
        record["config"]["method"], record["family"]  # noqa: B018 - what the card and the commit read
    except (ValueError, KeyError, TypeError):
        raise OutputError(f"{folder / CARD_JSON}: not a record `erasure train` wrote; export the run again") from None
    card = model_card(record, repo_id=repo_id, report=report)
    operations = publish_operations(folder, record, card)
    api = HfApi()  # the token: HF_TOKEN or the stored login, read by huggingface_hub itself
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.create_commit(repo_id, operations=operations,
                      commit_message=f"erasure: {record['config']['method']} on {record['config']['concept'] or 'a concept'}")
    return str(url)


def publish_operations(folder: Path, record: dict, card) -> list:
    """The commit that publishes `folder`: every file but NOT_PUBLISHED, the card and the public record
    in place of the local ones."""
    from huggingface_hub import CommitOperationAdd

    operations = [CommitOperationAdd("README.md", str(card).encode()),
                  CommitOperationAdd(CARD_JSON, json.dumps(public_record(record), indent=2).encode())]
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if (path.is_file() and relative.parts[0] not in NOT_PUBLISHED
                and str(relative) not in ("README.md", CARD_JSON) and not relative.parts[0].startswith(".")):
            operations.append(CommitOperationAdd(relative.as_posix(), str(path)))
    return operations
