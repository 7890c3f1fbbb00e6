"""Patch benchmark: `cdcca-edge delta diff` + `cdcca-edge patch` against
`zstd -19 --long --patch-from` on SmolLM2-135M GGUFs (q8_0 ~145 MB, f32 ~540 MB) and a
synthetic 2 GB q8_0 GGUF built here, for a change touching ~1% of the 32-weight blocks;
then apply on synthetic 0.5 GB and 2 GB files with the same number of changed blocks.

    python bench/patch.py [--sizes q8_0,f32,syn2g] [--patterns scattered,rows] [--repeat 5]
                          [--scaling/--no-scaling] [--section patch]
    python bench/patch.py --sizes q4_k_m --no-scaling --section patch-kquants

Writes bench/results/patch.json and the "patch" section of docs/benchmarks.md.

Change patterns, 1% of the blocks of every matrix:
- scattered: blocks chosen uniformly at random (the worst case for any in-place patcher:
  most 4 KiB pages hold a changed block);
- rows: whole rows chosen at random (what fine-tuning updates of some output units look
  like: the changed blocks are contiguous).
Changed blocks get new values near the old ones (requantised for q8_0), so the new bytes
are as incompressible as real weights.

Every command runs as a separate process under /usr/bin/time (wall time and peak RSS).
Our patch is durable (journal and data fsync'd); zstd writes a new file without fsync, as
in the issue's reference figures. Apply runs alternate ours/zstd, on fresh copies of the
base each time (page cache warm for both), and medians are reported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, smollm2_hf_dir, update_section, write_results  # noqa: E402
from cdcca_edge.core.paths import cache_dir  # noqa: E402

BIN = Path(sys.executable).parent
ZSTD = shutil.which("zstd") or "/usr/bin/zstd"
ZSTD_BIG_LEVEL = 3  # zstd level for files over 1 GiB


def timed(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of a command, measured by GNU time."""
    out = subprocess.run(["/usr/bin/time", "-f", "%e %M", *cmd], capture_output=True, text=True,
                         env=env, cwd=cwd)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {out.stderr[-2000:]}")
    wall, rss_kb = out.stderr.strip().splitlines()[-1].split()
    return float(wall), int(rss_kb) * 1024


def timed_json(cmd: list[str]) -> tuple[float, int, float]:
    """Like :func:`timed`, plus the ``seconds`` the command reports in its --json output
    (our patch's time inside the process, without interpreter start-up)."""
    out = subprocess.run(["/usr/bin/time", "-f", "%e %M", *cmd], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {out.stderr[-2000:]}")
    wall, rss_kb = out.stderr.strip().splitlines()[-1].split()
    return float(wall), int(rss_kb) * 1024, float(json.loads(out.stdout)["seconds"])


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


SYNTHETIC = {"syn2g": 2 << 30, "syn512m": 512 << 20}  # bytes of q8_0 weights
SYN_COLS = 4096


def synthetic_gguf(path: Path, nbytes: int) -> Path:
    """A q8_0 GGUF of about ``nbytes`` of 4096-column matrices holding random int8 blocks
    with sane scales (as incompressible as real weights; gguf-py's quantiser would take
    minutes for 2 GB)."""
    import gguf

    if path.exists():
        return path
    qt = gguf.GGMLQuantizationType.Q8_0
    block, size = gguf.GGML_QUANT_SIZES[qt]
    row_bytes = SYN_COLS // block * size
    rows = 4096
    n = max(1, round(nbytes / (rows * row_bytes)))
    rng = np.random.default_rng(7)
    scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    tmp = path.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_string("general.name", f"synthetic-{nbytes >> 20}M")
    for i in range(n):
        raw = rng.integers(-127, 128, (rows, SYN_COLS // block, size), dtype=np.int8).view(np.uint8)
        raw[:, :, :2] = scale
        w.add_tensor(f"blk.{i}.w", raw.reshape(rows, row_bytes), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(path)
    return path


def base_model(name: str, work: Path) -> Path:
    from cdcca_edge.converters.export import export

    if name in SYNTHETIC:
        return synthetic_gguf(work / f"{name}.gguf", SYNTHETIC[name])
    base = work / f"smollm2-{name}.gguf"
    if not base.exists():
        print(f"exporting SmolLM2-135M {name}", file=sys.stderr)
        export(smollm2_hf_dir(), base, "gguf", quant=name, validate=False)
    return base


def make_change(base: Path, new: Path, pattern: str, seed: int = 0, fraction: float = 0.01) -> dict:
    """Copy ``base`` to ``new`` and change ``fraction`` of the 32-weight blocks (the
    256-weight super-blocks of a K type) of every matrix."""
    import gguf

    from cdcca_edge.core.artifact import open_artifact
    from cdcca_edge.core.encodings import dequantize, quantize

    shutil.copy(base, new)
    art = open_artifact(new)
    rng = np.random.default_rng(seed)
    mm = np.memmap(new, dtype=np.uint8, mode="r+")
    changed = 0
    total = 0
    for t in art.tensors:
        if len(t.shape) != 2:
            continue
        qt = gguf.GGMLQuantizationType[t.type_name]
        block, size = gguf.GGML_QUANT_SIZES[qt]
        weights = max(32, block)  # weights per changed block
        per_unit = weights // block  # units per block (1 for q8_0 and K types, 32 for f32)
        bbytes = per_unit * size  # bytes per block
        n_blocks = t.nbytes // bbytes
        total += n_blocks
        k = max(1, round(n_blocks * fraction))
        if pattern == "scattered":
            idx = np.sort(rng.choice(n_blocks, k, replace=False))
        else:
            per_row = t.shape[-1] // weights
            rows = rng.choice(t.shape[0], max(1, k // per_row), replace=False)
            idx = np.sort((rows[:, None] * per_row + np.arange(per_row)).reshape(-1))
        raw = np.stack([mm[t.offset + i * bbytes : t.offset + (i + 1) * bbytes] for i in idx])
        vals = dequantize(t.type_name, raw.reshape(-1).copy()).reshape(len(idx), weights)
        vals = vals + rng.standard_normal(vals.shape).astype(np.float32) * (np.abs(vals).mean() * 0.1 + 1e-4)
        # requantised by the type's own quantiser (llama.cpp's for the K types)
        newraw = np.frombuffer(quantize(t.type_name, vals.astype(np.float32).reshape(-1)), np.uint8)
        newraw = newraw.reshape(len(idx), bbytes)
        for i, r in zip(idx, newraw):
            mm[t.offset + i * bbytes : t.offset + (i + 1) * bbytes] = r
        changed += len(idx)
    mm.flush()
    del mm
    return {"blocks_changed": changed, "blocks_total": total, "fraction": changed / total}


def fresh_device(base: Path, dst: Path, with_state: bool) -> Path:
    from cdcca_edge.core.artifact import compute_identity, open_artifact
    from cdcca_edge.core.state import record_export

    shutil.copy(base, dst)
    for side in (".cdcca-state.json", ".cdcca-state.leaves"):
        dst.with_name(dst.name + side).unlink(missing_ok=True)
    if with_state:  # a device that has its sidecars: what export and every patch leave behind
        art = open_artifact(dst)
        record_export(art, compute_identity(art).digest)
    subprocess.run(["sync"], check=True)
    return dst


def run_case(quant: str, pattern: str, repeat: int, work: Path, zstd_level: int) -> dict:
    base = base_model(quant, work)
    size = base.stat().st_size
    if size > 1 << 30:  # -19 on 2 GB takes over an hour here; its apply barely depends on it
        zstd_level = min(zstd_level, ZSTD_BIG_LEVEL)
    long = max(27, (size - 1).bit_length())  # zstd's window must cover the whole base
    new = work / f"smollm2-{quant}-{pattern}.gguf"
    change = make_change(base, new, pattern)
    print(f"{quant}/{pattern}: {change['blocks_changed']} blocks changed", file=sys.stderr)
    cli = str(BIN / "cdcca-edge")
    ours_delta = work / f"{quant}-{pattern}.cdcd"
    zpatch = work / f"{quant}-{pattern}.zst"
    subprocess.run(["sync"], check=True)
    ours_create = timed([cli, "delta", "diff", str(base), str(new), "-o", str(ours_delta), "--json"])
    print(f"  ours create {ours_create[0]:.2f} s", file=sys.stderr)
    # zstd -19 takes minutes; the change is deterministic, so its result is kept per
    # (base, new, level) and only re-made when missing
    key = hashlib.sha256(f"{size}:{_digest(new)}:{zstd_level}:{long}".encode()).hexdigest()[:16]
    cache = work / f"{quant}-{pattern}-{key}.zst"
    meta = cache.with_suffix(".json")
    if cache.exists() and meta.exists():
        zstd_create = tuple(json.loads(meta.read_text()))
        print(f"  zstd create {zstd_create[0]:.2f} s (measured earlier, patch reused)", file=sys.stderr)
    else:
        zstd_create = timed([ZSTD, "-q", "-f", f"-{zstd_level}", f"--long={long}",
                             f"--patch-from={base}", str(new), "-o", str(cache)])
        meta.write_text(json.dumps(zstd_create))
        print(f"  zstd create {zstd_create[0]:.2f} s", file=sys.stderr)
    shutil.copy(cache, zpatch)
    ours_apply, zstd_apply, cold = [], [], []
    for r in range(repeat):
        dev = fresh_device(base, work / "device.gguf", with_state=True)
        ours_apply.append(timed_json([cli, "patch", str(dev), str(ours_delta), "--json"]))
        assert _same_tensors(dev, new), "patched model differs from the target"
        out = work / "zstd-out.gguf"
        out.unlink(missing_ok=True)
        subprocess.run(["sync"], check=True)
        zstd_apply.append(timed([ZSTD, "-q", "-f", "-d", f"--long={long}", f"--patch-from={base}",
                                 str(zpatch), "-o", str(out)]))
        if r == 0:
            dev = fresh_device(base, work / "device.gguf", with_state=False)
            cold.append(timed_json([cli, "patch", str(dev), str(ours_delta), "--json"]))
        print(f"  apply {r + 1}/{repeat}: ours {ours_apply[-1][0]:.3f} s, zstd {zstd_apply[-1][0]:.3f} s",
              file=sys.stderr)
    assert (work / "zstd-out.gguf").read_bytes() == new.read_bytes()
    med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
    doc = {
        "quant": quant, "pattern": pattern, "model_bytes": size, **change,
        "ours": {
            "delta_bytes": ours_delta.stat().st_size,
            "create_seconds": ours_create[0], "create_peak_rss": ours_create[1],
            "apply_seconds": med(ours_apply, 0), "apply_peak_rss": max(x[1] for x in ours_apply),
            "apply_seconds_all": [x[0] for x in ours_apply],
            "apply_in_process_seconds": med(ours_apply, 2),
            "apply_cold_seconds": cold[0][0], "apply_cold_peak_rss": cold[0][1],
            "durable": True,
        },
        "zstd": {
            "command": f"zstd -{zstd_level} --long={long} --patch-from",
            "delta_bytes": zpatch.stat().st_size,
            "create_seconds": zstd_create[0], "create_peak_rss": zstd_create[1],
            "apply_seconds": med(zstd_apply, 0), "apply_peak_rss": max(x[1] for x in zstd_apply),
            "apply_seconds_all": [x[0] for x in zstd_apply],
            "durable": False,
        },
    }
    o, z = doc["ours"], doc["zstd"]
    doc["ratios"] = {
        "create_speedup": z["create_seconds"] / o["create_seconds"],
        "apply_speedup": z["apply_seconds"] / o["apply_seconds"],
        "delta_bytes_ours_over_zstd": o["delta_bytes"] / z["delta_bytes"],
    }
    for p in (new, zpatch, ours_delta, work / "zstd-out.gguf", work / "device.gguf",
              work / "device.gguf.cdcca-state.json", work / "device.gguf.cdcca-state.leaves"):
        p.unlink(missing_ok=True)
    return doc


def run_scaling(pattern: str, repeat: int, work: Path) -> dict:
    """Our apply on the 0.5 GB and the 2 GB synthetic files with the same number of
    changed blocks (1% of the 0.5 GB file's), alternating, medians."""
    cli = str(BIN / "cdcca-edge")
    small, big = base_model("syn512m", work), base_model("syn2g", work)
    frac = {small: 0.01, big: 0.01 * small.stat().st_size / big.stat().st_size}
    deltas, changes = {}, {}
    for base in (small, big):
        new = work / f"{base.stem}-{pattern}-scaling.gguf"
        changes[base] = make_change(base, new, pattern, fraction=frac[base])
        deltas[base] = work / f"{base.stem}-{pattern}-scaling.cdcd"
        subprocess.run([cli, "delta", "diff", str(base), str(new), "-o", str(deltas[base])],
                       check=True, capture_output=True)
        new.unlink()
    runs: dict[Path, list] = {small: [], big: []}
    for r in range(repeat):
        for base in (small, big) if r % 2 == 0 else (big, small):
            dev = fresh_device(base, work / "device.gguf", with_state=True)
            runs[base].append(timed_json([cli, "patch", str(dev), str(deltas[base]), "--json"]))
            print(f"  scaling {pattern} {base.stem}: {runs[base][-1][2]:.3f} s", file=sys.stderr)
    for base in (small, big):
        deltas[base].unlink()
    med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
    out = {"pattern": pattern, "files": []}
    for base in (small, big):
        out["files"].append({
            "model_bytes": base.stat().st_size, **changes[base],
            "apply_seconds": med(runs[base], 0), "apply_in_process_seconds": med(runs[base], 2),
            "apply_in_process_all": [x[2] for x in runs[base]],
            "apply_peak_rss": max(x[1] for x in runs[base]),
        })
    a, b = out["files"]
    out["big_over_small_in_process"] = b["apply_in_process_seconds"] / a["apply_in_process_seconds"]
    out["big_over_small_wall"] = b["apply_seconds"] / a["apply_seconds"]
    return out


def _same_tensors(a: Path, b: Path) -> bool:
    from cdcca_edge.core.artifact import compute_identity, open_artifact

    return compute_identity(open_artifact(a)).digest == compute_identity(open_artifact(b)).digest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="q8_0,f32,syn2g")
    ap.add_argument("--scaling", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--patterns", default="scattered,rows")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--zstd-level", type=int, default=19)
    ap.add_argument("--section", default="patch",
                    help="results file and docs/benchmarks.md section (e.g. patch-kquants for --sizes q4_k_m)")
    args = ap.parse_args()
    work = cache_dir() / "bench" / "patch"
    work.mkdir(parents=True, exist_ok=True)
    cases = [run_case(q, p, args.repeat, work, args.zstd_level)
             for q in args.sizes.split(",") for p in args.patterns.split(",")]
    scaling = [run_scaling(p, args.repeat, work) for p in args.patterns.split(",")] if args.scaling else []
    doc = {"machine": machine(), "repeat": args.repeat, "cases": cases, "scaling": scaling,
           "zstd_version": subprocess.run([ZSTD, "--version"], capture_output=True, text=True).stdout.strip()}
    path = write_results(args.section, doc)
    rows = []
    for c in cases:
        o, z, r = c["ours"], c["zstd"], c["ratios"]
        name = "synthetic q8_0" if c["quant"] in SYNTHETIC else c["quant"]
        rows.append(
            f"| {name} ({c['model_bytes'] / 1e6:.0f} MB) | {c['pattern']} | "
            f"{o['create_seconds']:.2f} / {z['create_seconds']:.1f} ({r['create_speedup']:.0f}x) | "
            f"{o['delta_bytes'] / 1e6:.2f} / {z['delta_bytes'] / 1e6:.2f} | "
            f"{o['apply_seconds']:.3f} / {z['apply_seconds']:.3f} ({r['apply_speedup']:.1f}x) | "
            f"{o['apply_in_process_seconds']:.3f} ({z['apply_seconds'] / o['apply_in_process_seconds']:.1f}x) | "
            f"{o['apply_peak_rss'] / 2**20:.0f} / {z['apply_peak_rss'] / 2**20:.0f} | "
            f"{o['apply_cold_seconds']:.2f} | {z['command'].split(' --')[0].removeprefix('zstd ')} |"
        )
    srows = []
    for sc in scaling:
        a, b = sc["files"]
        srows.append(
            f"| {sc['pattern']} | {a['blocks_changed']:,} / {b['blocks_changed']:,} | "
            f"{a['apply_in_process_seconds']:.3f} | {b['apply_in_process_seconds']:.3f} | "
            f"{sc['big_over_small_in_process']:.2f}x | {a['apply_seconds']:.3f} | {b['apply_seconds']:.3f} | "
            f"{sc['big_over_small_wall']:.2f}x | {a['apply_peak_rss'] / 2**20:.0f} / {b['apply_peak_rss'] / 2**20:.0f} |"
        )
    md = f"""## Patch: `delta diff` + `patch` vs `zstd --patch-from` (`bench/patch.py`)

SmolLM2-135M GGUFs and a synthetic 2 GB q8_0 GGUF (random int8 blocks, built by the
bench), 1% of the 32-weight blocks (the 256-weight super-blocks of a K type, requantised by
llama.cpp's quantiser) of every matrix changed. Each cell: ours / zstd. Our apply is durable (journal + data fsync'd) and includes interpreter start-up
(about 0.19 s of Python, typer and numpy imports); the next column is the time our patch
reports from inside the process. zstd's apply writes a new file without fsync. Apply: median of {args.repeat} alternating runs on
fresh copies; "cold" is our apply without the state sidecar (identity recomputed).
zstd runs at level {args.zstd_level} with a window covering the base, except level {ZSTD_BIG_LEVEL} on the 2 GB
file (-19 takes over an hour there; zstd's apply reads the base and writes a new file
whatever the level, so its apply time barely depends on it, but its delta is larger).
{doc['zstd_version']}.

| model | pattern | create s (speed-up) | delta MB | apply s (speed-up) | our apply inside the process s (speed-up) | apply peak RSS MiB | our cold apply s | zstd level |
|---|---|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

Apply cost against model size: synthetic q8_0 GGUFs of 0.5 GB and 2 GB, the **same number
of changed blocks** in both (1% of the 0.5 GB file's), ours only, durable, median of
{args.repeat} alternating runs each:

| pattern | blocks changed (0.5 / 2 GB) | 0.5 GB in process s | 2 GB in process s | ratio | 0.5 GB wall s | 2 GB wall s | ratio | peak RSS MiB |
|---|---:|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(srows)}
"""
    if not scaling:  # no scaling table to show
        md = md[: md.index("Apply cost against model size")].rstrip() + "\n"
    update_section(args.section, md)
    print(f"wrote {path}", file=sys.stderr)
    print(md)


if __name__ == "__main__":
    main()
