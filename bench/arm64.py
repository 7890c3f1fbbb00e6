"""Device footprint on aarch64: install size, peak memory and the aarch64 lane's time per
stage (docs/benchmarks.md, "Device footprint").

    sudo python bench/arm64.py [--repeat 3]

Runs in the aarch64 lane's root file system (tools/arm64_lane.py builds or reuses it),
under qemu-user, and the same commands on the host for comparison:
- installed size of the ``device`` extra for aarch64 (its own ``pip install --target``,
  without llama.cpp) and of llama.cpp's stripped libraries (both builds) and wheels;
- peak RSS of ``cdcca-edge run`` on the tiny GGUF (q8_0) and ONNX models, and of
  ``cdcca-edge patch`` on a 512 MiB q8_0 GGUF (1% of its blocks changed, scattered), each
  also as the rise above a bare interpreter's peak (``python3 -c pass``) on the same
  machine; under qemu-user a process's RSS includes the emulator's own (its translated
  code cache), which the baseline holds too;
- parity: the greedy tokens of every prebuilt export (and of image prompts to the tiny
  LLaVA's bundles) on aarch64, with each llama.cpp build, against the host's;
- the last ``make test-arm64`` run's wall time per stage, and which stages it built
  rather than found cached.

Writes bench/results/arm64.json and the "arm64" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import arm64_lane as lane  # noqa: E402

from bench.common import update_section, write_results  # noqa: E402
from bench.patch import make_change, synthetic_gguf  # noqa: E402
from cdcca_edge.core.paths import cache_dir  # noqa: E402
from tests.prebuilt import PARITY_TOKENS  # noqa: E402

BIG = 512 << 20  # bytes of q8_0 weights in the patched GGUF
PROMPT = "the red circle is"


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def install_sizes(cache: Path) -> dict:
    """MB of the device extra installed for aarch64, its largest packages, and llama.cpp."""
    target = cache / "device-only"
    if not target.exists():
        dist = cache / "dist"
        wheel = next(dist.glob("cdcca_edge-*.whl"))
        plat = [a for p in lane.PLATFORMS for a in ("--platform", p)]
        lane.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(target.with_suffix(".tmp")), *plat,
                  "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
                  f"{wheel}[device]"])
        os.replace(target.with_suffix(".tmp"), target)
    by_pkg: dict[str, int] = {}
    for p in target.iterdir():
        if p.is_dir() and not p.name.endswith((".dist-info", ".data")) and p.name != "bin":
            by_pkg[p.name] = _tree_bytes(p)
    libs = {}
    for name, build in lane.BUILDS.items():
        lib = lane.cross_build(cache, os.cpu_count() or 1, build)
        wheel = lane.make_wheel(cache, os.cpu_count() or 1, build, cache / "wheels")
        libs[name] = {"libraries_mb": _tree_bytes(lib) / 1e6, "wheel_mb": wheel.stat().st_size / 1e6,
                      "files": sorted(p.name for p in lib.glob("*.so"))}
    top = dict(sorted(by_pkg.items(), key=lambda kv: -kv[1])[:8])
    return {"device_extra_mb": _tree_bytes(target) / 1e6, "largest_mb": {k: v / 1e6 for k, v in top.items()},
            "llama_cpp": libs}


WRAPPER = (  # stderr to a file, not a pipe: a chatty child cannot block before wait4
    "import json, os, subprocess, sys, tempfile, time\n"
    "log = tempfile.TemporaryFile()\n"
    "t = time.monotonic()\n"
    "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=log)\n"
    "_, status, ru = os.wait4(p.pid, 0)\n"
    "log.seek(0)\n"
    "err = log.read().decode(errors='replace')[-2000:]\n"
    "print(json.dumps({'status': status, 'wall_s': time.monotonic() - t, 'maxrss_kb': ru.ru_maxrss, 'err': err}))\n"
)


def _wrapped(python: list[str], argv: list[str], repeat: int, setup=None) -> dict:
    """Run ``argv`` ``repeat`` times, each under a small wrapper (run by ``python``) that
    reads the child's own peak RSS from wait4: median wall seconds, max peak RSS MiB."""
    walls, rss = [], []
    for _ in range(repeat):
        if setup is not None:
            setup()
        proc = subprocess.run([*python, "-c", WRAPPER, *argv], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the wrapper failed: {proc.stderr[-2000:]}")
        doc = json.loads(proc.stdout.strip().splitlines()[-1])
        if doc["status"] != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {doc['err']}")
        walls.append(doc["wall_s"])
        rss.append(doc["maxrss_kb"] / 1024)
        print(f"  {' '.join(argv[:4])[:70]}: {walls[-1]:.1f} s, {rss[-1]:.0f} MiB", file=sys.stderr)
    return {"wall_s": statistics.median(walls), "peak_rss_mb": max(rss)}


def memory(fs: Path, pre: Path, work: Path, repeat: int) -> dict:
    """Peak RSS of the same commands on aarch64 (under qemu, generic build, Cortex-A72) and
    on the host."""
    from cdcca_edge.core.delta_build import diff_artifacts

    base = synthetic_gguf(work / "syn512m.gguf", BIG)
    delta = work / "d.cdcd"
    if not delta.exists():
        new = work / "syn512m-new.gguf"
        change = make_change(base, new, "scattered")
        diff_artifacts(base, new, delta)
        new.unlink()
        (work / "change.json").write_text(json.dumps(change))
    dev = work / "dev.gguf"

    def fresh() -> None:
        shutil.copy(base, dev)
        for side in (".cdcca-state.json", ".cdcca-state.leaves"):
            dev.with_name(dev.name + side).unlink(missing_ok=True)

    build = lane.BUILDS["generic"]
    out: dict = {}
    machines = {
        "aarch64": (lane.chroot_cmd(fs, build, ["/usr/bin/python3"]), "/prebuilt", "/work"),
        "x86_64": ([sys.executable], str(pre), str(work)),
    }
    with lane.mounted(fs, pre, {"/work": work}):
        for name, (python, pre_at, work_at) in machines.items():
            print(f"{name}:", file=sys.stderr)
            py = python[-1:] if name == "aarch64" else python  # inside the chroot
            cli = [*py, "-m", "cdcca_edge.cli"]
            cmds = {
                "interpreter": [*py, "-c", "pass"],
                # the modules `patch` imports, and nothing else: under qemu, their share of
                # the emulator's translated-code cache shows up here too
                "imports_for_patch": [*py, "-c", "import numpy, cdcca_edge.cli, cdcca_edge.core.patch"],
                "run_gguf_q8_0": [*cli, "run", f"{pre_at}/exports/llama-q8_0.gguf", "-p", PROMPT, "-n", "16",
                                  "--threads", "1"],
                "run_onnx_f32": [*cli, "run", f"{pre_at}/exports/llama-onnx", "-p", PROMPT, "-n", "16",
                                 "--threads", "1"],
                "patch_512mib_q8_0": [*cli, "patch", f"{work_at}/dev.gguf", f"{work_at}/d.cdcd", "--json"],
            }
            res = {k: _wrapped(python, argv, repeat, fresh if k.startswith("patch") else None)
                   for k, argv in cmds.items()}
            for k, v in res.items():
                v["above_interpreter_mb"] = v["peak_rss_mb"] - res["interpreter"]["peak_rss_mb"]
                v["above_imports_mb"] = v["peak_rss_mb"] - res["imports_for_patch"]["peak_rss_mb"]
            out[name] = res
    out["change"] = json.loads((work / "change.json").read_text())
    out["patched_file_mb"] = base.stat().st_size / 1e6
    return out


PARITY = """
import json
from pathlib import Path
from cdcca_edge.runtime import load
from cdcca_edge.runtime.multimodal import MultimodalModel
from tests.prebuilt import agreement, image_answers, manifest, prebuilt_path, text_answers
root = Path("/prebuilt")
doc = manifest(root)
out = {}
for key, want in sorted(doc["answers"].items()):
    with load(root / doc["exports"][key]["path"]) as m:
        got = text_answers(m)
    out[key] = [agreement(got[p], w) for p, w in want.items()]
for name, want in sorted(doc["image_answers"].items()):
    with MultimodalModel(prebuilt_path(root, name)) as mm:
        out[name + " (image prompts)"] = [agreement(g, w) for g, w in zip(image_answers(mm), want)]
print(json.dumps(out))
"""


def parity(fs: Path, pre: Path) -> dict:
    """Per export, for each parity prompt: the share of the host's greedy tokens that the
    aarch64 run reproduces before its first difference (1.0: identical), per build."""
    out = {}
    with lane.mounted(fs, pre):
        for name, build in lane.BUILDS.items():
            proc = subprocess.run(lane.chroot_cmd(fs, build, ["/usr/bin/python3", "-c", PARITY]),
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"parity on {name} failed: {proc.stderr[-2000:]}")
            out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def markdown(doc: dict) -> str:
    s = doc["sizes"]
    m = doc["memory"]
    ll = s["llama_cpp"]
    rows = "\n".join(
        f"| `{k}` | {m['aarch64'][k]['peak_rss_mb']:.0f} | {m['aarch64'][k]['above_interpreter_mb']:.0f} | "
        f"{m['aarch64'][k]['wall_s']:.1f} | {m['x86_64'][k]['peak_rss_mb']:.0f} | "
        f"{m['x86_64'][k]['above_interpreter_mb']:.0f} | {m['x86_64'][k]['wall_s']:.2f} |"
        for k in m["aarch64"])
    largest = ", ".join(f"{k} {v:.0f}" for k, v in s["largest_mb"].items())
    lane_doc = doc.get("lane")
    lane_md = "no `make test-arm64` run on record" if lane_doc is None else (
        ", ".join(f"{k} {v:.0f} s" for k, v in lane_doc["stages_s"].items())
        + f"; total {lane_doc['total_s'] / 60:.1f} min ({lane_doc['when']}; built this run: "
        + (", ".join(lane_doc["built"]) or "nothing, all cached") + ")")
    a, x = m["aarch64"], m["x86_64"]
    patch = "patch_512mib_q8_0"
    par = doc["parity"]
    prow = "\n".join(
        f"| {k} | " + " | ".join(
            f"{sum(x == 1.0 for x in par[b][k])}/{len(par[b][k])}, min {min(par[b][k]):.2f}" for b in par) + " |"
        for k in par["generic"])
    return f"""## Device footprint on aarch64 (`bench/arm64.py`, under qemu-user)

aarch64 figures come from the aarch64 lane's root file system (Debian bookworm, Python
3.11) under qemu-user with an emulated Cortex-A72 (Raspberry Pi 4) and the generic
llama.cpp build; x86_64 is the host. Wall times under emulation say nothing about a real
board's speed. Measured {doc['when']}, repeat {doc['repeat']} (median wall, max RSS).

**Installed size** (aarch64 wheels from PyPI, `pip install --target`):
the `device` extra without llama.cpp **{s['device_extra_mb']:.0f} MB** (goal <= 150 MB;
largest: {largest} MB); llama.cpp's stripped libraries **{ll['generic']['libraries_mb']:.1f} MB**
generic, {ll['pi5']['libraries_mb']:.1f} MB Pi 5 (goal <= 10 MB); the wheels
(`make wheel-arm64`) {ll['generic']['wheel_mb']:.1f} / {ll['pi5']['wheel_mb']:.1f} MB.

**Peak RSS, MiB** (`patch`: {m['patched_file_mb']:.0f} MB q8_0 GGUF, {m['change']['blocks_changed']:,}
blocks changed = {100 * m['change']['fraction']:.1f}%, no state sidecar so the identity is hashed;
"above" = minus a bare `python3 -c pass` on the same machine; goal <= 64 MiB above):

| command | aarch64 peak | aarch64 above | aarch64 wall s | x86_64 peak | x86_64 above | x86_64 wall s |
|---|---|---|---|---|---|---|
{rows}

`patch` on the 512 MiB file rises {a[patch]['above_interpreter_mb']:.0f} MiB above the bare interpreter on
aarch64 ({x[patch]['above_interpreter_mb']:.0f} MiB on x86_64); above the modules it imports
(`import numpy, cdcca_edge.cli, cdcca_edge.core.patch`, {a['imports_for_patch']['above_interpreter_mb']:.0f} MiB above bare on
aarch64, {x['imports_for_patch']['above_interpreter_mb']:.0f} MiB on x86_64) it is {a[patch]['above_imports_mb']:.0f} MiB on aarch64 and
{x[patch]['above_imports_mb']:.0f} MiB on x86_64: the patch's own buffers do not grow under emulation,
while qemu's translated-code cache, counted in every aarch64 figure, grows with the code run.

**Parity with x86_64**: greedy answers ({doc['parity_tokens']} tokens) on aarch64 against the host's, per
export: answers identical / prompts, and the smallest share of an answer that matches
before its first difference (tests/runtime/test_parity.py asserts identical for f32/f16
and >= 0.75 for q8_0/q4_0):

| export | generic build, Cortex-A72 | Pi 5 build, qemu max |
|---|---|---|
{prow}

**The lane's wall time per stage** (last `make test-arm64`): {lane_md}.
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    fs, pre = lane.prepare(os.cpu_count() or 1, list(lane.BUILDS))
    cache = cache_dir() / "arm64"
    work = cache_dir() / "bench" / "arm64"
    work.mkdir(parents=True, exist_ok=True)
    last = cache / "last-run.json"
    doc = {"when": time.strftime("%Y-%m-%d", time.gmtime()), "repeat": args.repeat,
           "sizes": install_sizes(cache), "memory": memory(fs, pre, work, args.repeat),
           "parity": parity(fs, pre), "parity_tokens": PARITY_TOKENS,
           "lane": json.loads(last.read_text()) if last.exists() else None}
    print(f"results: {write_results('arm64', doc)}", file=sys.stderr)
    update_section("arm64", markdown(doc))
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
