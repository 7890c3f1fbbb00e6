"""The demo over several seeds (``cdcca-edge demo --seeds N``): each seed draws its own
streams, test sets and upload draws (the models are the same, cached); each runs the loop
with UTS uploads (and the round-1 ablations) and again with random uploads of the same
count. The summary gives each figure's mean and 95% confidence interval over seeds, and
paired differences (same seed, same test set) with theirs: the comparison that cancels
what a seed's draw does to both arms alike.

Intervals are Student-t intervals over the per-seed values; with few seeds they are wide,
which is the point of reporting them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cdcca_edge.core.errors import UsageError
from cdcca_edge.demo.loop import ABLATIONS, DemoConfig, DemoReport, Stage, run_demo

# two-sided 95% quantiles of Student's t, by degrees of freedom (1-30); beyond, the normal's
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


@dataclass(frozen=True)
class Interval:
    """Mean and two-sided 95% confidence interval of per-seed values."""

    mean: float
    lo: float
    hi: float
    n: int
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: list[float]) -> "Interval":
        v = np.asarray(values, dtype=np.float64)
        if v.size == 0:
            raise UsageError("no values to summarise")
        m = float(v.mean())
        if v.size == 1:
            return cls(m, math.nan, math.nan, 1, tuple(values))
        half = t975(v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
        return cls(m, m - half, m + half, int(v.size), tuple(float(x) for x in values))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Interval":
        """An interval as report.json holds it (``asdict``)."""
        return cls(d["mean"], d["lo"], d["hi"], d["n"], tuple(d["values"]))

    def negated(self) -> "Interval":
        """The interval of the opposite difference (a - b -> b - a)."""
        return Interval(-self.mean, -self.hi, -self.lo, self.n, tuple(-x for x in self.values))

    def above(self, x: float) -> bool:
        """The whole interval lies above ``x``."""
        return self.lo > x

    def points(self) -> str:
        """``+1.2 [-0.3, +2.7]`` in percentage points (for accuracies and their differences)."""
        if self.n < 2:
            return f"{100 * self.mean:+.1f}"
        return f"{100 * self.mean:+.1f} [{100 * self.lo:+.1f}, {100 * self.hi:+.1f}]"

    def percent(self) -> str:
        if self.n < 2:
            return f"{100 * self.mean:.1f}%"
        return f"{100 * self.mean:.1f}% [{100 * self.lo:.1f}, {100 * self.hi:.1f}]"


def t975(df: int) -> float:
    return T975[df - 1] if df <= len(T975) else 1.96


def run_seeds(out_dir: str | Path, config: DemoConfig, seeds: int, stage: Stage | None = None,
              on_seed: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the loop for seeds ``config.seed`` .. ``config.seed + seeds - 1``, with UTS and with random uploads; write
    ``out_dir/report.{md,json}``, the plots, and each run under ``out_dir/seed-K/{uts,random}``.
    Returns the summary (what report.json holds)."""
    if seeds < 2:
        raise UsageError(f"--seeds must be >= 2 for intervals, got {seeds}")
    say = stage or (lambda _m: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, dict[str, Any]]] = []
    for k in range(config.seed, config.seed + seeds):
        pair = {}
        for sel in ("uts", "random"):
            cfg = replace(config, seed=k, selector=config.uts_selector if sel == "uts" else sel,
                          ablations=config.ablations and sel == "uts")
            rep: DemoReport = run_demo(out / f"seed-{k}" / sel, cfg,
                                       stage=lambda m, k=k, sel=sel: say(f"seed {k}, {sel} uploads: {m}"))
            pair[sel] = rep.as_dict()
        runs.append(pair)
        if on_seed:
            on_seed(k, pair)
    summary = summarise(runs)
    summary["config"] = asdict(config) | {"seeds": seeds}
    (out / "report.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_seed_plots(summary, out)
    (out / "report.md").write_text(render_seeds_markdown(summary))
    return summary


def _acc(rep: dict[str, Any], r: int, domain: str) -> float:
    row = rep["baseline"] if r == 0 else rep["rounds"][r - 1]
    return float(row[f"{domain}_accuracy"])


def summarise(runs: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per-seed runs ({"uts": report, "random": report} each) -> intervals and goals."""
    R = len(runs[0]["uts"]["rounds"])

    def iv(f: Callable[[dict[str, dict[str, Any]]], float]) -> dict[str, Any]:
        return asdict(Interval.of([f(p) for p in runs]))

    rounds = []
    for r in range(R + 1):
        row: dict[str, Any] = {"round": r}
        for sel in ("uts", "random"):
            if r == 0 and sel == "random":
                continue  # round 0 is the same model for both
            for dom in ("target", "source"):
                row[f"{sel}_{dom}"] = iv(lambda p, sel=sel, dom=dom: _acc(p[sel], r, dom))
        if r > 0:
            row["uts_minus_random_target"] = iv(lambda p: _acc(p["uts"], r, "target") - _acc(p["random"], r, "target"))
            row["uts_minus_round0_source"] = iv(lambda p: _acc(p["uts"], r, "source") - _acc(p["uts"], 0, "source"))
            row["uts_uplink_bytes"] = iv(lambda p: float(p["uts"]["rounds"][r - 1]["uplink_bytes"]))
            row["random_uplink_bytes"] = iv(lambda p: float(p["random"]["rounds"][r - 1]["uplink_bytes"]))
            row["uts_downlink_bytes"] = iv(lambda p: float(p["uts"]["rounds"][r - 1]["downlink_bytes"]))
            row["uts_uploaded_target_fraction"] = iv(
                lambda p: float(p["uts"]["rounds"][r - 1]["uploaded_target_fraction"]))
        rounds.append(row)
    out: dict[str, Any] = {
        "seeds": len(runs),
        "test_per_domain": runs[0]["uts"]["config"]["test"],
        "teacher_target": iv(lambda p: p["uts"]["baseline"]["teacher_accuracy"]),
        "teacher_source": iv(lambda p: p["uts"]["baseline"]["teacher_source_accuracy"]),
        "teacher_minus_student_target": iv(
            lambda p: p["uts"]["baseline"]["teacher_accuracy"] - p["uts"]["baseline"]["target_accuracy"]),
        "rounds": rounds,
    }
    doms = runs[0]["uts"]["baseline"].get("target_by_domain") or {}
    out["by_domain"] = {d: {
        "teacher": iv(lambda p, d=d: p["uts"]["baseline"]["teacher_by_domain"][d]),
        "student": iv(lambda p, d=d: p["uts"]["baseline"]["target_by_domain"][d]),
        "gap": iv(lambda p, d=d: p["uts"]["baseline"]["teacher_by_domain"][d] - p["uts"]["baseline"]["target_by_domain"][d]),
    } for d in doms}
    if all(p["uts"].get("ablations") for p in runs):
        names = [n for n in runs[0]["uts"]["ablations"]["variants"]]
        abl: dict[str, Any] = {}
        for n in names:
            abl[n] = {
                "target": iv(lambda p, n=n: p["uts"]["ablations"]["variants"][n]["target_accuracy"]),
                "minus_akd": iv(lambda p, n=n: p["uts"]["ablations"]["variants"][n]["target_accuracy"]
                                - p["uts"]["ablations"]["variants"]["akd"]["target_accuracy"]),
                "uplink_bytes": iv(lambda p, n=n: float(p["uts"]["ablations"]["variants"][n]["uplink_bytes"])),
            }
        out["ablations"] = abl
    out["goals"] = goals(out)
    return out


def goals(s: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 17's goals that this run measures, each with its figure and whether it is met."""
    I = Interval.from_dict  # noqa: E741 - a short name for a re-read Interval
    g: list[dict[str, Any]] = []
    tt, gap = I(s["teacher_target"]), I(s["teacher_minus_student_target"])
    g.append({"goal": "teacher accuracy on the target domains >= 85%", "measured": tt.percent(),
              "met": tt.mean >= 0.85})
    g.append({"goal": "teacher - student (round 0) on the target domains >= 20 points", "measured": gap.points(),
              "met": gap.mean >= 0.20})
    R = len(s["rounds"]) - 1
    for r in sorted({1, R}):
        d = I(s["rounds"][r]["uts_minus_random_target"])
        g.append({"goal": f"UTS - random uploads (equal count), target accuracy after round {r}: >= 2 points, "
                          "paired 95% interval above 0",
                  "measured": d.points(), "met": d.mean >= 0.02 and d.above(0.0)})
    d = I(s["rounds"][R]["uts_minus_round0_source"])
    # a source domain that improves is no regression: the interval's low end decides
    g.append({"goal": f"source accuracy after round {R} within 1 point of round 0 (paired interval, "
                      "low end >= -1)", "measured": d.points(), "met": d.lo >= -0.01})
    abl = s.get("ablations")
    if abl:
        singles = [n for n in ("pseudo_label_only", "logit_kd_only") if n in abl]
        best = max(singles, key=lambda n: abl[n]["target"]["mean"])
        full_minus_best = I(abl[best]["minus_akd"]).negated()
        g.append({"goal": f"full AKD - best single loss ({best}): interval includes or is above 0",
                  "measured": full_minus_best.points(), "met": full_minus_best.hi >= 0.0})
        full_minus_pl = I(abl["pseudo_label_only"]["minus_akd"]).negated()
        g.append({"goal": "full AKD - pseudo-labels only: interval above 0", "measured": full_minus_pl.points(),
                  "met": full_minus_pl.above(0.0)})
    return g


def write_seed_plots(s: dict[str, Any], out: Path) -> None:
    """seeds-accuracy.png (accuracy by round, mean and 95% interval, UTS and random uploads)
    and seeds-differences.png (the paired differences, with intervals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    rows = s["rounds"]
    for key, label, fmt, dx in (("uts_target", "target, UTS uploads", "o-", -0.04),
                                ("random_target", "target, random uploads", "^--", 0.0),
                                ("uts_source", "source, UTS uploads", "s-", 0.04)):
        xs = [r["round"] + dx for r in rows]
        pts = [r.get(key, r["uts_target"]) for r in rows]  # round 0 has no random arm: the same model
        m = np.array([p["mean"] for p in pts])
        err = np.array([[p["mean"] - p["lo"] for p in pts], [p["hi"] - p["mean"] for p in pts]])
        ax.errorbar(xs, m, yerr=err, fmt=fmt, capsize=3, label=label)
    t = s["teacher_target"]
    ax.axhspan(t["lo"], t["hi"], color="grey", alpha=0.2)
    ax.axhline(t["mean"], ls=":", c="grey", label="teacher, target")
    ax.set_xlabel("round")
    ax.set_ylabel(f"accuracy (mean, 95% CI, {s['seeds']} seeds)")
    ax.set_xticks([r["round"] for r in rows])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "seeds-accuracy.png", dpi=120)
    plt.close(fig)
    diffs = [("UTS - random, round %d" % r["round"], r["uts_minus_random_target"]) for r in rows if r["round"] > 0]
    diffs += [("source: round %d - round 0" % rows[-1]["round"], rows[-1]["uts_minus_round0_source"])]
    for name, v in (s.get("ablations") or {}).items():
        if name != "akd":
            diffs.append((f"{name} - akd (round 1)", v["minus_akd"]))
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(diffs) + 1.0))
    y = np.arange(len(diffs))[::-1]
    m = np.array([100 * d["mean"] for _, d in diffs])
    err = np.array([[100 * (d["mean"] - d["lo"]) for _, d in diffs], [100 * (d["hi"] - d["mean"]) for _, d in diffs]])
    ax.errorbar(m, y, xerr=err, fmt="o", capsize=3)
    ax.axvline(0, c="grey", lw=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels([n for n, _ in diffs], fontsize=7)
    ax.set_xlabel(f"paired difference, points (mean, 95% CI, {s['seeds']} seeds)", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "seeds-differences.png", dpi=120)
    plt.close(fig)


def render_seeds_markdown(s: dict[str, Any]) -> str:
    def p(d: dict[str, Any]) -> str:
        return Interval.from_dict(d).percent()

    def pts(d: dict[str, Any]) -> str:
        return Interval.from_dict(d).points()

    n, per = s["seeds"], s["test_per_domain"]
    lines = [f"# cdcca-edge demo over {n} seeds", "",
             f"Mean and 95% confidence interval over {n} seeds (Student t); each seed draws its own streams, "
             f"test sets ({per} questions per domain: target = noise + texture, {2 * per} questions; source "
             f"{per}) and upload draws. Differences are paired: same seed, same test set.", "",
             f"Teacher: target {p(s['teacher_target'])}, source {p(s['teacher_source'])}; teacher - student "
             f"(round 0) on target {pts(s['teacher_minus_student_target'])} points"
             + "".join(f"; on {d} alone: teacher {p(v['teacher'])}, student {p(v['student'])}, gap "
                       f"{pts(v['gap'])}" for d, v in (s.get("by_domain") or {}).items()) + ".", "",
             "| round | target, UTS | target, random | UTS - random (points) | source, UTS | source - round 0 "
             "(points) | uplink B, UTS / random | downlink B |",
             "|---|---|---|---|---|---|---|---|"]
    for r in s["rounds"]:
        if r["round"] == 0:
            lines.append(f"| 0 | {p(r['uts_target'])} | (same model) | - | {p(r['uts_source'])} | - | - | - |")
            continue
        lines.append(f"| {r['round']} | {p(r['uts_target'])} | {p(r['random_target'])} "
                     f"| {pts(r['uts_minus_random_target'])} | {p(r['uts_source'])} "
                     f"| {pts(r['uts_minus_round0_source'])} | {r['uts_uplink_bytes']['mean']:,.0f} / "
                     f"{r['random_uplink_bytes']['mean']:,.0f} | {r['uts_downlink_bytes']['mean']:,.0f} |")
    abl = s.get("ablations")
    if abl:
        lines += ["", "Round-1 ablations (from the original student, on round 1's stream, evaluated in torch on "
                  "the target test set):", "", "| variant | target acc | minus full AKD (points) |", "|---|---|---|"]
        for name, v in abl.items():
            label = ABLATIONS.get(name, name)
            lines.append(f"| {label} | {p(v['target'])} | {'-' if name == 'akd' else pts(v['minus_akd'])} |")
    lines += ["", "| goal (issue 17) | measured | met |", "|---|---|---|"]
    for g in s["goals"]:
        lines.append(f"| {g['goal']} | {g['measured']} | {'yes' if g['met'] else '**no**'} |")
    lines += ["", "![accuracy by round](seeds-accuracy.png) ![paired differences](seeds-differences.png)", ""]
    return "\n".join(lines) + "\n"
