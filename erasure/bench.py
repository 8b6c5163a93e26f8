"""`erasure bench micro --concept striped`: every method on the same micro-world data, seeds and budget.

With ``--frontier`` each method instead trains once for a long budget under the training-time
monitor (erasure/monitor.py), which reads the model every k steps on a fixed subset of the world's
captions, named and by alias: UA, implicit UA, neighbour accuracy and RA along the run — the
frontier — over several seeds. UCE, which has no steps, draws its frontier over its preserve scale
λ_p. The table reports *retention at erasure*: per method, the best neighbour accuracy and RA among
the points with UA ≥ 0.90 and with UA ≥ 0.95, averaged over the seeds that reach it.

With ``--attack`` the frontier also asks whether the concept comes back: every method is attacked
(``erasure attack``, eval/attack-micro-<concept>.yaml) at its *erasure point*, the model a user gets
with ``stop_at_erasure: 0.95`` and the bench's checks — the first check with UA ≥ 0.95, re-trained
to it (the run is deterministic: the re-trained check must equal the frontier's), or the end of the
budget where no check reaches it. For UCE it is the largest λ_p that reaches it (the least edit that
erases), or the smallest λ_p where none does. The attack table gives each method's ASR per attack at
that point beside its neighbour accuracy and RA there, the base's ASR above them, and a plot of ASR
against neighbour accuracy.

Each method trains from ``recipes/world/<concept>/<method>.yaml`` in its own process (so its peak
memory is its own: the child's peak RSS from ``wait4``, and the GPU peak from its erasure card when
on CUDA), then one evaluation renders the micro suite (``eval/micro-<concept>.yaml``) for the base
world and every erased model with the same prompts and seeds. The table is RGD's Table 1 in
miniature: UA, neighbour accuracy, RA, forget context, Fréchet distance to the base in the oracle's
features, wall time and peak memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from erasure.atomic import write_atomically
from erasure.methods import METHOD_TABLE
from erasure.shipped import shipped
from erasure.world.data import CONCEPTS


# The recommended recipe, recipes/world/erase.yaml, names no concept: the bench passes it the
# concept and the world's pair sets as flags, as a user does.
RECOMMENDED = "erase"


def recipe_path(concept: str, method: str) -> Path:
    if method == RECOMMENDED:
        return shipped("recipes", "world", f"{RECOMMENDED}.yaml")
    return shipped("recipes", "world", concept, f"{method}.yaml")


def concept_flags(concept: str, method: str) -> dict:
    if method != RECOMMENDED:
        return {}
    return {"concept": concept, "forget_data": f"world:{concept}/forget", "retain_data": f"world:{concept}/retain"}


def default_methods(concept: str) -> list[str]:
    """Every recipe for ``concept``: the method table's order first, then variants by name, then the
    recommended recipe."""
    stems = sorted(p.stem for p in shipped("recipes", "world", concept).glob("*.yaml"))
    found = [m for m in METHOD_TABLE if m in stems] + [s for s in stems if s not in METHOD_TABLE]
    return found + ([RECOMMENDED] if recipe_path(concept, RECOMMENDED).is_file() else [])


def train_one(recipe: Path, out: Path, overrides: dict, show: bool) -> dict:
    """Train in a child process; returns wall seconds, peak RSS and the card's figures."""
    command = [sys.executable, "-m", "erasure.cli", "train", "--recipe", str(recipe), "--output_dir", str(out)]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=None if show else subprocess.DEVNULL,
                             stderr=None if show else subprocess.PIPE)
    stderr = b""
    if not show:  # read before waiting, so a chatty child cannot fill the pipe and stall
        stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)  # wait4, not wait: it returns this child's own peak RSS
    code = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if code != 0:
        tail = stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"training {recipe} failed (exit {code})" + (":\n" + "\n".join(tail) if tail else ""))
    card = json.loads((out / "erasure.json").read_text())
    stats = card.get("run", {})
    # ru_maxrss is in KiB on Linux
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024,
            "peak_gpu_gib": stats.get("peak_gpu_memory_gib"), "mean_step_s": stats.get("mean_step_seconds")}


def bench_micro(concept: str, out: str | Path, methods: list[str] | None = None, steps: int | None = None,
                limit: int | None = None, show: bool = True) -> dict:
    from erasure.eval.runner import evaluate
    from erasure.eval.suite import load_suite

    if concept not in CONCEPTS:
        raise ValueError(f"--concept {concept!r}; the micro-world concepts are {', '.join(CONCEPTS)}")
    methods = methods or default_methods(concept)
    missing = [m for m in methods if not recipe_path(concept, m).is_file()]
    if missing:
        raise ValueError(f"no recipe for {', '.join(missing)} under {shipped('recipes', 'world', concept)}; "
                         f"have: {', '.join(default_methods(concept))}")
    out = Path(out)
    overrides = {"max_steps": steps} if steps else {}
    costs = {}
    for method in methods:
        if show:
            print(f"\n== {method}", flush=True)
        costs[method] = train_one(recipe_path(concept, method), out / "models" / method,
                                  {**concept_flags(concept, method), **overrides}, show)
    suite_overrides = {"prompts": {"limit": limit}} if limit else {}
    suite = load_suite(shipped("eval", f"micro-{concept}.yaml"), suite_overrides)
    report = evaluate(suite, ["world:micro"] + [str(out / "models" / m) for m in methods], out / "eval", show=show)
    rows = []
    for name, model in zip(["base"] + methods, report["models"]):
        rows.append({"method": name, **model["metrics"]["micro_world"], **costs.get(name, {})})
    result = {"concept": concept, "steps": steps, "limit": limit, "rows": rows,
              "suite": report["protocol"]["suite_file"], "versions": report["protocol"]["versions"]}
    write_atomically(out / "bench.json", lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))
    table = bench_table(result)
    write_atomically(out / "bench.md", lambda f: f.write((table + "\n").encode()))
    bench_plot(result, out / "bench.png")
    return result


FRONTIER = {"steps": 150, "every": 10, "images": 192, "seeds": (0, 1, 2)}
UCE_PRESERVE_SCALES = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
THRESHOLDS = (0.90, 0.95)
CURVE_KEYS = ("UA", "implicit_UA", "neighbour_accuracy", "RA")


# The erasure point the attacks read: where `stop_at_erasure: 0.95` ends a run.
ATTACK_UA = 0.95


def bench_frontier(concept: str, out: str | Path, methods: list[str] | None = None, steps: int | None = None,
                   every: int | None = None, images: int | None = None, seeds=None, preserve_scales=None,
                   attack: str | Path | None = None, limit: int | None = None, show: bool = True) -> dict:
    from erasure.config import read_recipe

    if concept not in CONCEPTS:
        raise ValueError(f"--concept {concept!r}; the micro-world concepts are {', '.join(CONCEPTS)}")
    # The attack suite is read (and refused) before hours of training, not after.
    suite = load_bench_attack_suite(attack, concept, limit) if attack else None
    methods = methods or default_methods(concept)
    missing = [m for m in methods if not recipe_path(concept, m).is_file()]
    if missing:
        raise ValueError(f"no recipe for {', '.join(missing)} under {shipped('recipes', 'world', concept)}")
    for name, value in (("--steps", steps), ("--every", every), ("--images", images)):
        if value is not None and value < 1:
            raise ValueError(f"{name}: must be ≥ 1, got {value}")
    steps, every = steps or FRONTIER["steps"], every or FRONTIER["every"]
    images, seeds = images or FRONTIER["images"], tuple(seeds if seeds is not None else FRONTIER["seeds"])
    out = Path(out)
    watch = frontier_watch(every, images)
    curves = {}
    for method in methods:
        closed = METHOD_TABLE[read_recipe(recipe_path(concept, method))["method"]].closed_form
        runs = []
        for seed in seeds:
            if show:
                print(f"\n== {method}, seed {seed}", flush=True)
            points = []
            # UCE has no steps: its points are edits at increasing preserve scales λ_p.
            for scale in ((preserve_scales or UCE_PRESERVE_SCALES) if closed else (None,)):
                overrides = {**concept_flags(concept, method), **watch, "seed": seed,
                             **({"uce_preserve_scale": scale} if closed else {"max_steps": steps})}
                folder = frontier_folder(out, method, seed, scale)
                cost = train_one(recipe_path(concept, method), folder, overrides, show=False)
                history = json.loads((folder / "erasure.json").read_text())["run"]["monitor"]["history"]
                for check in history:
                    points.append({"step": check["step"], **({"uce_preserve_scale": scale} if closed else {}),
                                   **{k: check["world"][k] for k in CURVE_KEYS}})
            runs.append({"seed": seed, "points": points, "wall_s": cost["wall_s"]})
            if suite is not None:  # a trained run's overrides are the loop's one; UCE's are not read again
                runs[-1]["erasure_point"] = erasure_point_model(recipe_path(concept, method), points, closed,
                                                                overrides, frontier_folder(out, method, seed))
        curves[method] = {"runs": runs, "closed_form": closed, "retention": retention_at_erasure(runs)}
    result = {"concept": concept, "steps": steps, "every": every, "images": images, "seeds": list(seeds),
              "captions": "world:all+aliases", "methods": curves}
    write_frontier(result, out)
    if suite is not None:  # the frontier is written first: an attack that fails keeps it
        result["attack"] = attack_erasure_points(suite, curves, out / "attack", show)
        write_frontier(result, out)
    return result


def write_frontier(result: dict, out: Path) -> None:
    """frontier.json, .md and .png; with attacks, frontier-attack.md and .png."""
    write_atomically(out / "frontier.json", lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))
    write_atomically(out / "frontier.md", lambda f: f.write((frontier_table(result) + "\n").encode()))
    frontier_plot(result, out / "frontier.png")
    if "attack" in result:
        write_atomically(out / "frontier-attack.md", lambda f: f.write((frontier_attack_table(result) + "\n").encode()))
        frontier_attack_plot(result, out / "frontier-attack.png")


def frontier_watch(every: int, images: int) -> dict:
    """The overrides that make a training run a frontier run: the whole trajectory (a recipe's own
    stop is switched off), read every ``every`` steps on a fixed subset of ``images`` world captions
    (the recipe's own monitor prompts give way to it)."""
    return {"monitor_every": every, "monitor_prompts": "world:all+aliases", "monitor_images": images,
            "stop_at_erasure": "null", "checkpointing_steps": 0}


def frontier_folder(out: Path, method: str, seed: int, scale: float | None = None) -> Path:
    """A frontier run's export; UCE's, one per preserve scale λ_p."""
    folder = out / "models" / f"{method}-seed{seed}"
    return folder / f"lp{scale:g}" if scale is not None else folder


def load_bench_attack_suite(path, concept: str, limit: int | None) -> dict:
    from erasure.errors import SuiteError
    from erasure.eval.attack import load_attack_suite

    suite = load_attack_suite(path, {"prompts": {"limit": limit}} if limit is not None else None)
    named = suite["metrics"].get("micro_world", {}).get("concept")
    if named != concept:
        raise SuiteError(f"--attack {path}: reads {named or 'no micro-world concept'}; the bench erases {concept!r} "
                         f"(e.g. eval/attack-micro-{concept}.yaml)")
    return suite


def erasure_point(points: list[dict], closed: bool) -> dict:
    """Where a run is attacked (module docstring): its first check with UA ≥ ATTACK_UA, or the end of
    its budget; for UCE the largest λ_p that reaches it, or the smallest λ_p."""
    reached = [p for p in points if p["UA"] is not None and p["UA"] >= ATTACK_UA]
    if closed:
        scale = lambda p: p["uce_preserve_scale"]  # noqa: E731
        point = max(reached, key=scale) if reached else min(points, key=scale)
    else:
        point = reached[0] if reached else points[-1]
    return {**point, "reached": bool(reached)}


def erasure_point_model(recipe: Path, points: list[dict], closed: bool, overrides: dict, run: Path) -> dict:
    """The erasure point and the model at it. A trained run that reaches it before its last check is
    trained again with ``stop_at_erasure`` into ``<run>-erasure``; the check it stops at must read
    what the frontier's did (``reproduced``), or the attacked model is not the frontier's point."""
    point = erasure_point(points, closed)
    if closed:
        return {**point, "model": str(run / f"lp{point['uce_preserve_scale']:g}")}
    if point["step"] == points[-1]["step"]:
        return {**point, "model": str(run)}
    folder = run.with_name(run.name + "-erasure")
    train_one(recipe, folder, {**overrides, "stop_at_erasure": ATTACK_UA}, show=False)
    check = json.loads((folder / "erasure.json").read_text())["run"]["monitor"]["history"][-1]
    again = {"step": check["step"], **{k: check["world"][k] for k in CURVE_KEYS}}
    return {**point, "model": str(folder), "reproduced": again == {k: point[k] for k in again}}


def attack_erasure_points(suite: dict, curves: dict, out: Path, show: bool) -> dict:
    """`erasure attack` on the base and every run's erasure-point model, in one report under ``out``;
    each run's ASR per attack goes beside its point, each method's mean ± std over seeds."""
    from erasure.eval.attack import run_attacks

    runs = [run for curve in curves.values() for run in curve["runs"]]
    report = run_attacks(suite, ["world:micro"] + [run["erasure_point"]["model"] for run in runs], out, show=show)
    rates = [{a: entry["asr"] for a, entry in model["attacks"].items()} for model in report["models"]]
    for run, asr in zip(runs, rates[1:]):
        run["erasure_point"]["asr"] = asr
    for curve in curves.values():
        curve["attack"] = {a: _mean_std([run["erasure_point"]["asr"][a] for run in curve["runs"]])
                           for a in suite["attacks"]}
    # The base on the checks' captions: every trained run's step-0 check reads the base model.
    base = [run["points"][0] for curve in curves.values() if not curve["closed_form"] for run in curve["runs"]]
    return {"suite": report["protocol"]["suite_file"], "ua": ATTACK_UA, "report": str(out / "attack.md"),
            "attacked_prompts": report["protocol"]["prompts"]["evaluated_prompts"], "base": {
                "asr": rates[0], **{k: _mean_std([p[k] for p in base]) if base else None for k in CURVE_KEYS}}}


def _mean_std(values: list[float]) -> list[float]:
    import numpy as np

    return [float(np.mean(values)), float(np.std(values))]


def retention_at_erasure(runs: list[dict]) -> dict:
    """Per threshold: over the seeds whose run reached UA ≥ threshold, the mean (and spread) of the
    best neighbour accuracy and the best RA among the points that reached it."""
    import numpy as np

    table = {}
    for threshold in THRESHOLDS:
        best = {"neighbour_accuracy": [], "RA": []}
        for run in runs:
            reached = [p for p in run["points"] if p["UA"] is not None and p["UA"] >= threshold]
            if reached:
                for key in best:
                    best[key].append(max(p[key] for p in reached))
        table[f"{threshold:.2f}"] = {"seeds_reached": len(best["RA"]), "seeds": len(runs),
                                     **{k: (float(np.mean(v)), float(np.std(v))) if v else None
                                        for k, v in best.items()}}
    return table


def frontier_table(result: dict) -> str:
    head = " | ".join(f"neighbour @ UA ≥ {t:.2f} ↑ | RA @ UA ≥ {t:.2f} ↑" for t in THRESHOLDS)
    lines = [f"| method | {head} |", "|---|" + "---|" * (2 * len(THRESHOLDS))]
    for method, curve in result["methods"].items():
        cells = []
        for threshold in THRESHOLDS:
            r = curve["retention"][f"{threshold:.2f}"]
            if r["RA"] is None:
                cells += ["not reached", "not reached"]
                continue
            note = "" if r["seeds_reached"] == r["seeds"] else f" ({r['seeds_reached']}/{r['seeds']} seeds)"
            cells += [f"{r['neighbour_accuracy'][0]:.3f} ± {r['neighbour_accuracy'][1]:.3f}{note}",
                      f"{r['RA'][0]:.3f} ± {r['RA'][1]:.3f}{note}"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pm(stat: list[float] | None, seeds: int) -> str:
    if stat is None:
        return "—"
    return f"{stat[0]:.3f}" + (f" ± {stat[1]:.3f}" if seeds > 1 else "")


def frontier_attack_table(result: dict) -> str:
    """Per method: where its runs were attacked, what they kept there, and the ASR of every attack."""
    attack = result["attack"]
    attacks = list(attack["base"]["asr"])
    lines = [f"| method | erasure point (UA ≥ {attack['ua']:.2f}) | UA | neighbour acc. ↑ | RA ↑ | "
             + " | ".join(f"ASR {a} ↓" for a in attacks) + " |", "|---|---|---|---|---|" + "---|" * len(attacks)]
    base = attack["base"]
    lines.append("| base | — | " + " | ".join(_pm(base[k], 1) for k in ("UA", "neighbour_accuracy", "RA")) + " | "
                 + " | ".join(f"{base['asr'][a]:.3f}" for a in attacks) + " |")
    for method, curve in result["methods"].items():
        points = [run["erasure_point"] for run in curve["runs"]]
        where = ", ".join((f"λ_p {p['uce_preserve_scale']:g}" if curve["closed_form"] else f"step {p['step']}")
                          + ("" if p["reached"] else " (not reached)") + (" ⚠ not reproduced" if p.get("reproduced") is False else "")
                          for p in points)
        cells = [_pm(_mean_std([p[k] for p in points]), len(points)) for k in ("UA", "neighbour_accuracy", "RA")]
        cells += [_pm(curve["attack"][a], len(points)) for a in attacks]
        lines.append(f"| {method} | {where} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def frontier_attack_plot(result: dict, path: Path) -> None:
    """ASR against neighbour accuracy at each method's erasure point, one panel per attack: the
    bottom-right corner is the goal. Hollow markers: some seed never reached the erasure point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    attack = result["attack"]
    attacks = list(attack["base"]["asr"])
    fig, axes = plt.subplots(1, len(attacks), figsize=(3.6 * len(attacks), 3.9), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], attacks):
        for k, (method, curve) in enumerate(result["methods"].items()):
            points = [run["erasure_point"] for run in curve["runs"]]
            x = [p["neighbour_accuracy"] for p in points]
            y = [p["asr"][name] for p in points]
            colour = f"C{k % 10}"
            reached = all(p["reached"] for p in points)
            ax.errorbar(np.mean(x), np.mean(y), xerr=np.std(x), yerr=np.std(y), fmt="o" if k < 10 else "s",
                        color=colour, mfc=colour if reached else "white", label=method, capsize=2)
        if attack["base"]["neighbour_accuracy"] is not None:
            ax.scatter(attack["base"]["neighbour_accuracy"][0], attack["base"]["asr"][name], marker="*", s=120,
                       color="black", label="base", zorder=3)
        ax.set_title(name, fontsize=10)
        ax.set_xlim(0, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("neighbour accuracy at the erasure point ↑")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"ASR ({result['concept']} comes back) ↓")
    fig.legend(*axes[0][0].get_legend_handles_labels(), fontsize=7, loc="center right")  # beside, not over, the points
    fig.suptitle(f"micro world, {result['concept']!r}: attacks at the erasure point (UA ≥ {attack['ua']:.2f}; "
                 "hollow: not reached)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / fig.get_figwidth(), 1))
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def frontier_plot(result: dict, path: Path) -> None:
    """UA against neighbour accuracy and against RA, one curve per method: the mean over seeds at each
    step (UCE: each λ_p), with a band of ± one standard deviation of the retention axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
    for method, curve in result["methods"].items():
        by_point = {}
        for run in curve["runs"]:
            for p in run["points"]:
                by_point.setdefault(p.get("uce_preserve_scale", p["step"]), []).append(p)
        order = sorted(by_point)
        for ax, key in zip(axes, ("neighbour_accuracy", "RA")):
            ua = np.array([np.mean([p["UA"] for p in by_point[k]]) for k in order])
            x = np.array([np.mean([p[key] for p in by_point[k]]) for k in order])
            spread = np.array([np.std([p[key] for p in by_point[k]]) for k in order])
            style = "--" if curve["closed_form"] else "-"
            line, = ax.plot(x, ua, style, marker=".", label=method)
            ax.fill_betweenx(ua, x - spread, x + spread, color=line.get_color(), alpha=0.15)
    for ax, label in zip(axes, ("neighbour accuracy (other values kept) ↑", "RA (everything else kept) ↑")):
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(label)
        ax.axhline(0.95, color="gray", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"UA ({result['concept']} erased) ↑")
    axes[1].legend(fontsize=7, loc="lower left")
    seeds = len(result["seeds"])
    fig.suptitle(f"micro world: erasing {result['concept']!r} — frontier over {seeds} seed{'s' * (seeds != 1)}, "
                 f"every {result['every']} steps (UCE: over λ_p)")
    fig.tight_layout()
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def _f(value, digits=3):
    return "—" if value is None else f"{value:.{digits}f}"


def bench_table(result: dict) -> str:
    gpu = any(r.get("peak_gpu_gib") for r in result["rows"])
    memory = "peak GPU GiB" if gpu else "peak RSS MiB"
    lines = [f"| method | UA ↑ | implicit UA ↑ | neighbour acc. ↑ | RA ↑ | forget context ↑ | Fréchet to base ↓ "
             f"| wall s | {memory} |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        mem = r.get("peak_gpu_gib") if gpu else r.get("peak_rss_mib")
        lines.append(f"| {r['method']} | {_f(r['UA'])} | {_f(r.get('implicit_UA'))} | {_f(r['neighbour_accuracy'])} | "
                     f"{_f(r['RA'])} | {_f(r['forget_context'])} | {_f(r['frechet_to_first'])} | "
                     f"{_f(r.get('wall_s'), 0)} | {_f(mem, 2 if gpu else 0)} |")
    return "\n".join(lines)


def bench_plot(result: dict, path: Path) -> None:
    """UA against neighbour accuracy, one point per method: the top-right corner is the goal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for r in result["rows"]:
        ax.scatter(r["neighbour_accuracy"] or 0, r["UA"] or 0, s=40)
        ax.annotate(r["method"], (r["neighbour_accuracy"] or 0, r["UA"] or 0), xytext=(4, 3),
                    textcoords="offset points", fontsize=8)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("neighbour accuracy (other values kept) ↑")
    ax.set_ylabel(f"UA ({result['concept']} erased) ↑")
    ax.set_title(f"micro world: erasing {result['concept']!r}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
