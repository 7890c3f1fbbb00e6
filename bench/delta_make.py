"""`cdcca-edge delta make --advance-mirror` for a SmolLM2-135M LoRA update, the code of
another commit ("before") against this checkout ("after"): wall time and peak RSS of
the whole command, alternating, medians.

    python bench/delta_make.py [--before 825f5a4] [--after HEAD] [--repeat 3] [--probe/--no-probe]

The update: a PEFT LoRA adapter of AKD's shape (rank 8, alpha 16, every attention and MLP
projection) on SmolLM2-135M-Instruct, with lora_B drawn at random (seed 0) so that the
update moves the weights by about 1% (a trained adapter of this shape costs the same to
ship: the work depends on the shapes, not the values). The mirror: SmolLM2 as q8_0 GGUF
with its state sidecar, as export leaves it; a fresh copy for every run.

"before" runs from a git worktree of that commit with this venv; "after" from this
checkout, or from a worktree of ``--after`` (so the checkout can change meanwhile). Writes
bench/results/delta_make.json and the "delta_make" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, smollm2_hf_dir, update_section, write_results  # noqa: E402
from bench.patch import base_model, timed  # noqa: E402
from cdcca_edge.core.paths import cache_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROBE = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "Water boils at"]


def make_adapter(hf: Path, out: Path) -> Path:
    """A rank-8 LoRA adapter on every projection, lora_B random (seed 0)."""
    if (out / "adapter_model.safetensors").exists():
        return out
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from cdcca_edge.cloud.akd import DEFAULT_LORA_TARGETS

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(DEFAULT_LORA_TARGETS),
                          task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tmp.rename(out)
    return out


def code_tree(rev: str, work: Path) -> Path:
    """A worktree of ``rev`` (created once)."""
    where = work / f"tree-{rev}"
    if not (where / "cdcca_edge").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), rev],
                       check=True, capture_output=True)
    return where


def prepared_mirror(code: Path, base: Path, dst: Path) -> Path:
    """A fresh copy of ``base`` with the state sidecar ``code``'s export would write."""
    shutil.copy(base, dst)
    for side in (".cdcca-state.json", ".cdcca-state.leaves", ".cdcca-trial-undo.cdcd"):
        dst.with_name(dst.name + side).unlink(missing_ok=True)
    script = ("import sys; from cdcca_edge.core.artifact import open_artifact, compute_identity; "
              "from cdcca_edge.core.state import record_export; a = open_artifact(sys.argv[1]); "
              "record_export(a, compute_identity(a).digest)")
    _run([sys.executable, "-c", script, str(dst)], code, check=True)
    subprocess.run(["sync"], check=True)
    return dst


def _env(code: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(code)}


# `python -m` puts the working directory first on sys.path: run each code from its own tree
def _run(cmd: list[str], code: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(code), cwd=code, **kw)


def run_once(code: Path, mirror: Path, adapter: Path, hf: Path, out: Path, probe: Path | None) -> dict:
    cmd = [sys.executable, "-m", "cdcca_edge.cli", "delta", "make", "--base", str(mirror),
           "--target", str(adapter), "--target-base", str(hf), "-o", str(out), "--advance-mirror", "--json"]
    if probe is not None:
        cmd += ["--probe", str(probe)]
    wall, rss = timed(cmd, env=_env(code), cwd=code)
    target = json.loads(_run(
        [sys.executable, "-m", "cdcca_edge.cli", "delta", "inspect", str(out), "--json"], code,
        capture_output=True, text=True, check=True).stdout)["target_identity"]
    # each code computes identities its own way: check the advanced mirror with that code
    check = _run(
        [sys.executable, "-c", "import sys, cdcca_edge; from cdcca_edge.core.artifact import open_artifact, "
         "compute_identity; assert cdcca_edge.__file__.startswith(sys.argv[2]), cdcca_edge.__file__; "
         "print(compute_identity(open_artifact(sys.argv[1])).digest)", str(mirror), str(code)], code,
        capture_output=True, text=True, check=True).stdout.strip()
    if check != target:
        raise RuntimeError(f"{code}: the advanced mirror is not at the delta's target")
    return {"seconds": wall, "peak_rss": rss, "delta_bytes": out.stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="825f5a4", help="commit to compare against")
    ap.add_argument("--after", default=None, help="commit to measure (default: this checkout)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    work = cache_dir() / "bench" / "delta_make"
    work.mkdir(parents=True, exist_ok=True)
    hf = smollm2_hf_dir()
    adapter = make_adapter(hf, work / "smollm2-lora-r8")
    base = base_model("q8_0", cache_dir() / "bench" / "patch")
    probe = None
    if args.probe:
        probe = work / "probe.jsonl"
        probe.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROBE))
    after = ROOT if args.after is None else code_tree(args.after, work)
    codes = {"before": code_tree(args.before, work), "after": after}
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for r in range(args.repeat):
        for which in ("before", "after") if r % 2 == 0 else ("after", "before"):
            mirror = prepared_mirror(codes[which], base, work / "mirror.gguf")
            runs[which].append(run_once(codes[which], mirror, adapter, hf, work / "out.cdcd", probe))
            print(f"  {which} {r + 1}/{args.repeat}: {runs[which][-1]['seconds']:.1f} s, "
                  f"{runs[which][-1]['peak_rss'] / 2**20:.0f} MiB", file=sys.stderr)
    med = {k: {"seconds": statistics.median(x["seconds"] for x in v),
               "peak_rss": statistics.median(x["peak_rss"] for x in v),
               "delta_bytes": v[-1]["delta_bytes"], "all_seconds": [x["seconds"] for x in v]}
           for k, v in runs.items()}
    rev = subprocess.run(["git", "-C", str(after), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    doc = {"machine": machine(), "repeat": args.repeat, "before": args.before, "after": rev,
           "probe_prompts": len(PROBE) if args.probe else 0, "model_bytes": base.stat().st_size,
           "results": med, "speedup": med["before"]["seconds"] / med["after"]["seconds"]}
    write_results("delta_make", doc)
    b, a = med["before"], med["after"]
    md = f"""## `delta make --advance-mirror`: one SmolLM2 LoRA update (`bench/delta_make.py`)

SmolLM2-135M q8_0 GGUF mirror ({doc['model_bytes'] / 1e6:.0f} MB, state sidecar present), a
rank-8 LoRA adapter on every projection (random lora_B, about a 1% weight change),
{doc['probe_prompts']} probe prompts for the KL; the whole command as a process, median of
{args.repeat} alternating runs, each on a fresh copy of the mirror.

| code | wall s | peak RSS MiB | delta bytes |
|---|---:|---:|---:|
| before ({args.before}) | {b['seconds']:.1f} | {b['peak_rss'] / 2**20:.0f} | {b['delta_bytes']:,} |
| after ({rev}) | {a['seconds']:.1f} | {a['peak_rss'] / 2**20:.0f} | {a['delta_bytes']:,} |

Speed-up: **{doc['speedup']:.2f}x** (goal: >= 3x).
"""
    update_section("delta_make", md)
    print(md)


if __name__ == "__main__":
    main()
