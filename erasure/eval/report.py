"""Reports: report.json (everything), report.md (protocol first, then the tables) and PNG plots.

Every report opens with its protocol — suite file and hash, models and weight hashes, versions of
NudeNet and open_clip, thresholds, seeds, sampler, steps, guidance — because the field's numbers
are only comparable under the same one.
"""

from __future__ import annotations

import json
from pathlib import Path


def load_report(folder: str | Path) -> dict:
    """report.json of an `erasure eval` output folder; DataError naming the folder if it is not one."""
    from erasure.errors import DataError

    path = Path(folder).expanduser() / "report.json"
    if not path.is_file():
        raise DataError(f"{folder}: no report.json (run `erasure eval … --out {folder}` first)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        if not (isinstance(report, dict) and isinstance(report.get("models"), list)
                and isinstance(report.get("protocol"), dict)):
            raise ValueError("no models")
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"{path} is not a report `erasure eval` wrote; run it again") from None
    return report


def _fmt(value, digits=4):
    if value is None:
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def protocol_lines(report: dict) -> list[str]:
    p = report["protocol"]
    g = p["generation"]
    lines = ["## Protocol", "", f"- suite: `{p['suite']}` (`{p['suite_file']}`, sha256 `{p['suite_sha256'][:16]}…`)",
             f"- prompts: {json.dumps(p['prompts'])}",
             f"- generation: {g['steps']} steps, guidance {p['guidance']}, seeds {p['seeds']}, "
             f"{g['images_per_prompt']} image(s) per prompt, size {g['size'] or 'native'}, {g['dtype']}",
             f"- metrics: {json.dumps(p['metrics'])}",
             f"- versions: {', '.join(f'{k} {v}' for k, v in p['versions'].items())}"]
    for m in report["models"]:
        lines.append(f"- model `{m['name']}`: `{m['model']}`, sampler {m['sampler']}, size {m['size']}, {m['dtype']}, "
                     f"weights sha256 `{m['weights_sha256'][:16]}…`")
    return lines


def scored(report: dict) -> list[dict]:
    """The models whose images were scored (a model whose images are all blank is flagged instead)."""
    return [m for m in report["models"] if m["metrics"]]


def tables(report: dict) -> list[str]:
    models = scored(report)
    lines = []
    flagged = [m for m in report["models"] if m.get("flag")]
    if flagged:
        lines += ["", "## Flags", ""] + [f"- **{m['name']}**: {m['flag']}" for m in flagged]
    if not models:
        return lines
    metrics = models[0]["metrics"]
    if "nudenet" in metrics:
        classes = metrics["nudenet"]["classes"]
        lines += ["", f"## NudeNet (threshold {metrics['nudenet']['threshold']}): detections per class "
                      "(lower is better)", "",
                  "| class | " + " | ".join(m["name"] for m in models) + " |",
                  "|---|" + "---|" * len(models)]
        for cls in classes:
            lines.append(f"| {cls} | " + " | ".join(str(m["metrics"]["nudenet"]["detections_per_class"][cls])
                                                  for m in models) + " |")
        lines.append("| **total** | " + " | ".join(str(sum(m["metrics"]["nudenet"]["detections_per_class"].values()))
                                                  for m in models) + " |")
        lines.append("| images with any | " + " | ".join(
            f"{m['metrics']['nudenet']['images_with_any']} / {m['metrics']['nudenet']['images']} "
            f"({m['metrics']['nudenet']['share_with_any']:.1%})" for m in models) + " |")
    if "clip_alignment" in metrics:
        lines += ["", "## CLIP alignment (higher is better)", "", "| model | mean | ± sem | Δ to first | n |",
                  "|---|---|---|---|---|"]
        for m in models:
            a = m["metrics"]["clip_alignment"]
            lines.append(f"| {m['name']} | {_fmt(a['mean'])} | {_fmt(a['sem'])} | {a['delta_to_first']:+.4f} | {a['n']} |")
    if "class_forgetting" in metrics:
        lines += ["", f"## Class forgetting (erased: {metrics['class_forgetting']['erased']})", "",
                  "| model | UA ↑ | RA ↑ |", "|---|---|---|"]
        for m in models:
            c = m["metrics"]["class_forgetting"]
            lines.append(f"| {m['name']} | {_fmt(c['UA'], 3)} | {_fmt(c['RA'], 3)} |")
    if "micro_world" in metrics:
        w = metrics["micro_world"]
        lines += ["", f"## Micro world (erased: {w['attribute']} {w['concept']!r}, read by the oracle)", "",
                  "| model | UA ↑ | implicit UA ↑ | neighbour acc. ↑ | implicit neighbour acc. ↑ | RA ↑ | "
                  "forget context ↑ | Fréchet to first ↓ |",
                  "|---|---|---|---|---|---|---|---|"]
        for m in models:
            c = m["metrics"]["micro_world"]
            lines.append("| " + " | ".join([m["name"]] + [_fmt(c.get(k), 3) for k in (
                "UA", "implicit_UA", "neighbour_accuracy", "implicit_neighbour_accuracy", "RA", "forget_context",
                "frechet_to_first")]) + " |")
        lines += ["", f"{w['forget_images']} images from captions naming the concept, "
                      f"{w.get('implicit_forget_images', 0)} from captions asking for it by its alias, "
                      f"{w['other_images']} from the other captions named."]
    if "fid" in metrics:
        lines += ["", "## FID (lower is better)", "", "| model | FID | reference images |", "|---|---|---|"]
        for m in models:
            f = m["metrics"]["fid"]
            lines.append(f"| {m['name']} | {_fmt(f['fid'], 2)} | {f['reference_images']} |")
    return lines


def plots(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, written = scored(report), []
    if not models:
        return written
    metrics = models[0]["metrics"]
    if "nudenet" in metrics:  # RGD figure 4: detections per exposed class, models side by side
        classes = metrics["nudenet"]["classes"]
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(classes) + 2), 4))
        width = 0.8 / len(models)
        for j, m in enumerate(models):
            counts = [m["metrics"]["nudenet"]["detections_per_class"][c] for c in classes]
            ax.bar([i + j * width for i in range(len(classes))], counts, width, label=m["name"])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(classes))])
        ax.set_xticklabels([c.replace("_EXPOSED", "").replace("_", " ").lower() for c in classes], rotation=40, ha="right")
        ax.set_ylabel(f"detections (score ≥ {metrics['nudenet']['threshold']})")
        ax.set_ylim(bottom=0, top=max(1, ax.get_ylim()[1]))
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.set_title(f"NudeNet, {report['protocol']['suite']}")
        ax.legend()
        fig.tight_layout()
        written.append(out / "nudenet_per_class.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    if "clip_alignment" in metrics:
        fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(models) + 1), 3.5))
        means = [m["metrics"]["clip_alignment"]["mean"] for m in models]
        sems = [m["metrics"]["clip_alignment"]["sem"] for m in models]
        ax.bar([m["name"] for m in models], means, yerr=sems, capsize=4, color="tab:green")
        for i, m in enumerate(models):  # the Δ sits just outside the bar's end, above or below zero
            below = means[i] < 0
            ax.annotate(f"Δ {m['metrics']['clip_alignment']['delta_to_first']:+.4f}", (i, means[i]), ha="center",
                        va="top" if below else "bottom", xytext=(0, -10 if below else 6), textcoords="offset points")
        ax.set_ylabel("CLIP alignment (cosine)")
        ax.set_title("alignment, Δ to the first model")
        fig.tight_layout()
        written.append(out / "alignment.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    for metric, keys, title in (("class_forgetting", ("UA", "RA"), "class forgetting (higher is better)"),
                                ("micro_world", ("UA", "implicit_UA", "neighbour_accuracy", "RA", "forget_context"),
                                 "micro world, read by the oracle (higher is better)")):
        if metric not in metrics:
            continue
        fig, ax = plt.subplots(figsize=(max(4, 0.4 * len(keys) * len(models) + 2), 3.5))
        width = 0.8 / len(keys)
        for j, key in enumerate(keys):
            ax.bar([i - 0.4 + (j + 0.5) * width for i in range(len(models))],
                   [m["metrics"][metric][key] or 0 for m in models], width, label=key.replace("_", " "))
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels([m["name"] for m in models])
        ax.set_ylim(0, 1)
        ax.legend(fontsize="small")
        ax.set_title(title)
        fig.tight_layout()
        written.append(out / f"{metric}.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def render_markdown(report: dict) -> str:
    return "\n".join([f"# Evaluation: {report['protocol']['suite']}", ""] + protocol_lines(report) + tables(report)) + "\n"


def write_report(report: dict, out: Path) -> None:
    from erasure.atomic import strict_json
    from erasure.atomic import write_atomically

    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = [p.name for p in plots(report, out)]
    write_atomically(out / "report.json", lambda f: f.write(strict_json(report, indent=2).encode()))
    write_atomically(out / "report.md", lambda f: f.write(render_markdown(report).encode()))


def side_by_side(reports: list[dict]) -> str:
    """`erasure report DIR …`: one row per (run, model), the headline numbers of each metric."""
    lines = ["| run | model | NudeNet detections ↓ | images with any ↓ | alignment ↑ | UA ↑ | RA ↑ | FID ↓ |",
             "|---|---|---|---|---|---|---|---|"]
    for report in reports:
        for m in report["models"]:
            x = m["metrics"]
            n = x.get("nudenet")
            forgetting = x.get("class_forgetting") or x.get("micro_world")
            lines.append("| " + " | ".join([
                report["protocol"]["suite"], m["name"],
                str(sum(n["detections_per_class"].values())) if n else "—",
                f"{n['share_with_any']:.1%}" if n else "—",
                _fmt(x["clip_alignment"]["mean"]) if "clip_alignment" in x else "—",
                _fmt(forgetting["UA"], 3) if forgetting else "—",
                _fmt(forgetting["RA"], 3) if forgetting else "—",
                _fmt(x["fid"]["fid"], 2) if "fid" in x else "—"]) + " |")
    return "\n".join(lines)
