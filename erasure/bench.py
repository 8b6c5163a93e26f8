"""`erasure bench micro --concept striped`: every method on the same micro-world data, seeds and budget.

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

from erasure.data.generate import write_atomically
from erasure.methods import METHOD_TABLE
from erasure.world.data import CHECKOUT as ROOT
from erasure.world.data import CONCEPTS


def recipe_path(concept: str, method: str) -> Path:
    return ROOT / "recipes" / "world" / concept / f"{method}.yaml"


def default_methods(concept: str) -> list[str]:
    """Every recipe for ``concept``: the method table's order first, then variants by name."""
    stems = sorted(p.stem for p in (ROOT / "recipes" / "world" / concept).glob("*.yaml"))
    return [m for m in METHOD_TABLE if m in stems] + [s for s in stems if s not in METHOD_TABLE]


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
        raise ValueError(f"no recipe for {', '.join(missing)} under {ROOT / 'recipes' / 'world' / concept}; "
                         f"have: {', '.join(default_methods(concept))}")
    out = Path(out)
    overrides = {"max_steps": steps} if steps else {}
    costs = {}
    for method in methods:
        if show:
            print(f"\n== {method}", flush=True)
        costs[method] = train_one(recipe_path(concept, method), out / "models" / method, overrides, show)
    suite_overrides = {"prompts": {"limit": limit}} if limit else {}
    suite = load_suite(ROOT / "eval" / f"micro-{concept}.yaml", suite_overrides)
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


def _f(value, digits=3):
    return "—" if value is None else f"{value:.{digits}f}"


def bench_table(result: dict) -> str:
    gpu = any(r.get("peak_gpu_gib") for r in result["rows"])
    memory = "peak GPU GiB" if gpu else "peak RSS MiB"
    lines = [f"| method | UA ↑ | neighbour acc. ↑ | RA ↑ | forget context ↑ | Fréchet to base ↓ | wall s | {memory} |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        mem = r.get("peak_gpu_gib") if gpu else r.get("peak_rss_mib")
        lines.append(f"| {r['method']} | {_f(r['UA'])} | {_f(r['neighbour_accuracy'])} | {_f(r['RA'])} | "
                     f"{_f(r['forget_context'])} | {_f(r['frechet_to_first'])} | {_f(r.get('wall_s'), 0)} | "
                     f"{_f(mem, 2 if gpu else 0)} |")
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
