"""The CDCCA loop, end to end, on the embedded shapes VQA benchmark (``cdcca-edge demo``).

A LLaVA-style teacher (trained on every scene domain) and a smaller student (source
domain only) share one frozen vision tower. The student is exported to a device bundle;
then, each round:

1. the device answers a stream of target-domain image questions and UTS selects uploads
   (an uplink bundle carrying half of each selected image's visual tokens);
2. the cloud distils the teacher into the student from every bundle so far (AKD on visual
   tokens) and compresses the update against its mirror of the device bundle (DWC);
3. the device patches its bundle in place, reloads, and is evaluated on held-out target
   and source test sets, seeing whole images.

Then the ablations of the paper on the same data: UTS vs random selection at the same
number of uploads, AKD vs pseudo-labels only and logit KD only, and the DWC delta vs a
full re-download and the fp16 adapter. Models are trained deterministically on first use
and cached under the cache directory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cdcca_edge.demo.scenes import DOMAINS, IMAGE_SIZE, Example, dataset
from cdcca_edge.demo.tiny_llava import TinyLlavaSpec
from cdcca_edge.core.errors import UsageError
from cdcca_edge.core.paths import build_cached, cache_dir

TARGET_DOMAINS = ("noise", "texture")  # the device's camera drifts to these
# the tower's pretraining and the teacher's steps are what make the teacher strong (86% on
# the drifted domains, against 68% with 300 tower steps on 2,000 images and 1,500 steps):
# the student must have something to learn from (docs/demo.md, "The models")
TEACHER = TinyLlavaSpec(hidden_size=96, intermediate_size=192, num_hidden_layers=2, domains=DOMAINS,
                        train_steps=2000, vision_pretrain_steps=3000, vision_pretrain_images=12000)
STUDENT = TinyLlavaSpec(hidden_size=64, intermediate_size=128, num_hidden_layers=2, domains=("source",),
                        train_steps=800)
QUICK_TEACHER = replace(TEACHER, train_steps=120, vision_pretrain_steps=60, vision_pretrain_images=500)
QUICK_STUDENT = replace(STUDENT, train_steps=80)
RAW_IMAGE_BYTES = IMAGE_SIZE * IMAGE_SIZE * 3  # an uncompressed RGB frame
DEVICE_BACKENDS = ("llama", "onnx")  # the device's language part: GGUF q8_0, or ONNX f32
LOOP_SELECTORS = ("uts", "uts-diverse", "random")
ABLATIONS = {  # the round-1 ablation variants, as reports label them; "akd" is the full method
    "akd": "AKD (CE + logit KD + feature KD), UTS uploads",
    "akd_random_selection": "AKD, random uploads (same count)",
    "pseudo_label_only": "pseudo-label CE only, UTS uploads",
    "logit_kd_only": "logit KD only, UTS uploads",
    "akd_teacher_weighted": "AKD weighted by the teacher's confidence, UTS uploads",
}


@dataclass
class DemoConfig:
    rounds: int = 3
    backend: str = "llama"  # the device's language part: llama (GGUF q8_0) or onnx (ONNX f32)
    quick: bool = False  # small models and sets: a smoke test of the whole loop
    stream: int = 160  # target-domain inputs the device sees per round
    test: int = 200  # held-out questions per domain: each target domain, and the source domain
    calibration: int = 60  # source-domain inputs for UTS calibration
    rate: float = 0.1  # UTS: fraction of in-distribution inputs that would be uploaded
    keep: float = 0.5  # fraction of visual tokens an upload carries
    # the anchor set, sent once, carries every token: distilled on half-images, it taught
    # the student to answer source images worse (docs/demo.md, "How the defaults were chosen")
    anchor_keep: float = 1.0
    epochs: int = 2  # AKD passes over the data (4 overfitted the round's few uploads: same page)
    lr: float = 2e-3  # AKD learning rate
    anchor: bool = True  # upload the calibration images once, as an anchor set for AKD
    # each round distils a fresh adapter on the original student from every bundle so far
    # (False: on the previous round's student)
    restart: bool = True
    ablations: bool = True
    # what the device uploads each round: "uts"; "uts-diverse" (as many, by uncertainty and
    # diversity over the images); or "random" (as many, chosen at random: the baseline at
    # equal count)
    selector: str = "uts"
    seed: int = 0

    @property
    def uts_selector(self) -> str:
        """The selector of the UTS arm (the ablations' and a seeds run's): this config's
        own, or ``uts`` when it is ``random``."""
        return "uts" if self.selector == "random" else self.selector

    def __post_init__(self) -> None:
        if self.backend not in DEVICE_BACKENDS:
            raise UsageError(f"--backend must be one of {', '.join(DEVICE_BACKENDS)}, got {self.backend!r}")
        if self.rounds < 1:
            raise UsageError("--rounds must be >= 1")
        if self.selector not in LOOP_SELECTORS:
            raise UsageError(f"selector must be one of {', '.join(LOOP_SELECTORS)}, got {self.selector!r}")
        if self.test < 1:
            raise UsageError("--test must be >= 1")
        if not 0.0 < self.anchor_keep <= 1.0 or not 0.0 < self.keep <= 1.0:
            raise UsageError("keep and anchor_keep must be in (0, 1]")
        if self.quick:
            self.stream, self.test, self.calibration, self.epochs = (min(self.stream, 32), min(self.test, 24),
                                                                     min(self.calibration, 12), min(self.epochs, 2))


Stage = Callable[[str], None]


def spec_key(*specs: TinyLlavaSpec) -> str:
    """The cache key of trained models' specs. A field at its default stays out of the key
    when it was added after the key first named models (``vision_tower``), so adding it
    keeps every cached model."""
    default = {f.name: f.default for f in fields(TinyLlavaSpec)}["vision_tower"]
    docs = [{k: v for k, v in asdict(s).items() if not (k == "vision_tower" and v == default)} for s in specs]
    return hashlib.sha256(json.dumps(docs, sort_keys=True).encode()).hexdigest()[:12]


def models(quick: bool, stage: Stage) -> tuple[Path, Path]:
    """(teacher dir, student dir), trained on first use and cached."""
    from cdcca_edge.demo.tiny_llava import build_tiny_llava

    t_spec, s_spec = (QUICK_TEACHER, QUICK_STUDENT) if quick else (TEACHER, STUDENT)
    root = cache_dir() / "demo"
    t_dir = root / f"llava-teacher-{spec_key(t_spec)}"
    s_dir = root / f"llava-student-{spec_key(t_spec, s_spec)}"
    if not (t_dir / "config.json").is_file():
        stage(f"training the teacher: vision tower + {t_spec.train_steps} steps on every domain (first run only)")
    build_cached(t_dir, lambda d: build_tiny_llava(d, t_spec))
    if not (s_dir / "config.json").is_file():
        stage(f"training the student: {s_spec.train_steps} steps on the source domain (first run only)")
    build_cached(s_dir, lambda d: build_tiny_llava(d, s_spec, vision_from=t_dir))
    return t_dir, s_dir


def held_out(per_domain: int, seed: int, domains: tuple[str, ...]) -> list[Example]:
    """``per_domain`` held-out questions from each of ``domains`` (equal counts, so the set's
    accuracy is the mean of the domains'), disjoint in seed from the streams."""
    if len(domains) == 1:
        return dataset(per_domain, seed=seed + 102, domains=domains)
    return [e for k, d in enumerate(domains) for e in dataset(per_domain, seed=seed + 101 + 1000 * k, domains=(d,))]


def _items(examples: list[Example], prefix: str) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i}", "prompt": e.question.text, "image": e.image, "domain": e.domain,
             "raw_bytes": RAW_IMAGE_BYTES + len(e.question.text.encode())} for i, e in enumerate(examples)]


def _domain_of(items: list[dict[str, Any]], item_id: str) -> str:
    return next(it["domain"] for it in items if it["id"] == item_id)


def device_correct(mm: Any, examples: list[Example]) -> np.ndarray:
    """(n,) bool: the device model's answer to each example is right."""
    return np.array([mm.answer(e.image, e.question.text) == e.question.answer for e in examples], dtype=bool)


def device_accuracy(mm: Any, examples: list[Example]) -> float:
    return float(device_correct(mm, examples).mean())


def torch_correct(model_dir: Path, examples: list[Example]) -> np.ndarray:
    """(n,) bool: a torch LLaVA's greedy answer to each example is right."""
    import torch
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from cdcca_edge.demo.tiny_llava import answer

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    return np.array([p == e.question.answer for p, e in zip(answer(model, tok, examples), examples)], dtype=bool)


def torch_accuracy(model_dir: Path, examples: list[Example]) -> float:
    return float(torch_correct(model_dir, examples).mean())


def by_domain(correct: np.ndarray, examples: list[Example]) -> dict[str, float]:
    """Accuracy per domain of ``examples``."""
    doms = np.array([e.domain for e in examples])
    return {str(d): float(correct[doms == d].mean()) for d in sorted(set(doms.tolist()))}


def _adapter_fp16_bytes(adapter_dir: Path) -> int:
    from safetensors.numpy import load_file

    return sum(v.size * 2 for v in load_file(str(adapter_dir / "adapter_model.safetensors")).values())


@dataclass
class DemoReport:
    config: dict[str, Any]
    teacher: str
    student: str
    device_artifact: str
    artifact_bytes: int
    baseline: dict[str, Any]  # round 0: before any update (accuracies; by domain for the target)
    export: dict[str, Any]  # the device bundle's export, with its validation against torch
    rounds: list[dict[str, Any]] = field(default_factory=list)
    ablations: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_demo(out_dir: str | Path, config: DemoConfig = DemoConfig(), stage: Stage | None = None,
             on_round: Callable[[dict[str, Any]], None] | None = None) -> DemoReport:
    """Run the loop; write ``out_dir/report.{md,json}`` and plots. Returns the report."""
    from cdcca_edge.cloud.akd import AKDConfig
    from cdcca_edge.cloud.akd_mm import distill_multimodal
    from cdcca_edge.cloud.dwc import make_delta
    from cdcca_edge.converters.export import export
    from cdcca_edge.core.artifact import compute_identity, open_artifact
    from cdcca_edge.core.errors import IntegrityError
    from cdcca_edge.core.patch import apply_delta
    from cdcca_edge.core.trust import Trust
    from cdcca_edge.runtime.multimodal import MultimodalModel
    from cdcca_edge.runtime.uts import calibrate, collect

    say = stage or (lambda _m: None)
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    teacher, student = models(config.quick, say)

    fmt, quant = ("gguf", "q8_0") if config.backend == "llama" else ("onnx", "f32")
    device = out / "device"
    mirror = work / "cloud-mirror"
    say(f"exporting the student to a {fmt} bundle (validated against torch)")
    exported = export(student, device, fmt, quant=quant)
    shutil.copytree(device, mirror)
    shutil.copytree(device, work / "device-original")  # for the ablations, as exported
    artifact_bytes = sum(p.stat().st_size for p in device.rglob("*") if p.is_file() and "cdcca-" not in p.name)

    s = config.seed * 10_000  # seeds far apart: no two seeds' sets share a scene
    target_test = held_out(config.test, s, TARGET_DOMAINS)
    source_test = held_out(config.test, s, ("source",))
    calib_set = dataset(config.calibration, seed=s + 103, domains=("source",))
    say("teacher accuracy (torch)")
    teacher_ok = torch_correct(teacher, target_test)
    teacher_acc = {"target": float(teacher_ok.mean()), "source": torch_accuracy(teacher, source_test)}

    def evaluate() -> dict[str, float]:
        with MultimodalModel(device, backend=config.backend) as mm:
            return {"target": device_accuracy(mm, target_test), "source": device_accuracy(mm, source_test)}

    say("calibrating UTS on source-domain images")
    identity = compute_identity(open_artifact(device)).digest
    with MultimodalModel(device, backend=config.backend) as mm:
        calib = calibrate(mm, _items(calib_set, "c"), identity, rate=config.rate, max_tokens=4, keep=config.keep)
        student_ok = device_correct(mm, target_test)
        base = {"target": float(student_ok.mean()), "source": device_accuracy(mm, source_test)}
    calib.save(work / "calibration.json")
    # an anchor set, sent once: the calibration images' uploads, with anchor_keep of their
    # tokens (every one by default). Distilling on them every round holds the source domain
    # back from trading itself for the drifted one (docs/demo.md, "How the defaults were chosen")
    anchor = work / "uplink-anchor.cdcu"
    if config.anchor:
        assert calib.visual is not None  # calibrated on images
        anchor_calib = replace(calib, visual=replace(calib.visual, keep=config.anchor_keep))
        with MultimodalModel(device, backend=config.backend) as mm:
            anchor_rep = collect(mm, _items(calib_set, "a"), anchor_calib, anchor, identity, selector="all")
    report = DemoReport(config=asdict(config), teacher=str(teacher), student=str(student), device_artifact=str(device),
                        artifact_bytes=artifact_bytes, export=exported.as_dict(),
                        baseline={"target_accuracy": base["target"], "source_accuracy": base["source"],
                                  "teacher_accuracy": teacher_acc["target"],
                                  "teacher_source_accuracy": teacher_acc["source"],
                                  "target_by_domain": by_domain(student_ok, target_test),
                                  "teacher_by_domain": by_domain(teacher_ok, target_test)})
    akd_cfg = AKDConfig(epochs=config.epochs, lr=config.lr, batch_size=8, max_new_tokens=4, holdout=0.0,
                        seed=config.seed)
    cloud_student = student
    bundles: list[Path] = [anchor] if config.anchor else []
    first_stream: list[dict[str, Any]] = []
    for r in range(1, config.rounds + 1):
        # the device's world: domains drawn uniformly, a third still the source, two thirds drifted
        stream = _items(dataset(config.stream, seed=s + 1000 + r, domains=("source", *TARGET_DOMAINS)), f"r{r}-")
        if r == 1:
            first_stream = stream
        bundle = work / f"uplink-{r}.cdcu"
        say(f"round {r}: the device answers {len(stream)} questions (two thirds from drifted domains); UTS selects uploads")
        identity = compute_identity(open_artifact(device)).digest
        with MultimodalModel(device, backend=config.backend) as mm:
            up = collect(mm, stream, calib, bundle, identity, selector=config.selector, seed=s + r)
        bundles.append(bundle)
        say(f"round {r}: AKD from {len(bundles)} bundle(s) ({up.n_uploaded} new uploads)")
        akd = distill_multimodal(teacher, cloud_student, bundles, work / f"akd-{r}", akd_cfg)
        merged = Path(akd.merged or "")
        say(f"round {r}: DWC delta against the cloud's mirror")
        delta = work / f"delta-{r}.cdcd"
        # the adapter on the cloud's current student: only what it changed, LoRA-shaped
        dwc = make_delta(mirror, work / f"akd-{r}", delta, target_base=cloud_student, advance_mirror=True,
                         expect_identity=identity)  # the identity the device reported with its uplink
        say(f"round {r}: the device patches its bundle in place")
        t = time.perf_counter()
        apply_delta(device, delta, trust=Trust.none())
        patch_seconds = time.perf_counter() - t
        # the central invariant: the cloud's mirror is the device's model, byte for byte
        mirror_id = compute_identity(open_artifact(mirror)).digest
        device_id = compute_identity(open_artifact(device)).digest
        if mirror_id != device_id:
            raise IntegrityError(f"round {r}: the cloud's mirror ({mirror_id[:16]}) is not the device's "
                                 f"model ({device_id[:16]}); the next delta would be built for the "
                                 "wrong base")
        acc = evaluate()
        # the anchor set goes up with the first round's bundle
        extra = anchor_rep.bundle_bytes if config.anchor and r == 1 else 0
        row = {
            "round": r, "target_accuracy": acc["target"], "source_accuracy": acc["source"],
            "identity": device_id,  # the device's and the mirror's, checked equal
            "teacher_accuracy": teacher_acc["target"], "uplink_bytes": up.bundle_bytes + extra,
            "anchor_bytes": extra,
            "raw_input_bytes": up.raw_input_bytes, "uploaded_raw_bytes": up.uploaded_raw_bytes,
            "n_seen": up.n_seen, "n_uploaded": up.n_uploaded,
            "uploaded_target_fraction": float(np.mean([_domain_of(stream, i) != "source"
                                                       for i in up.uploaded_ids])) if up.uploaded_ids else 0.0,
            "uplink_bytes_per_sample": up.bundle_bytes / max(1, up.n_uploaded),
            "downlink_bytes": dwc.bytes, "artifact_bytes": artifact_bytes, "patch_seconds": patch_seconds,
            "akd_steps": akd.steps, "akd_seconds": akd.seconds, "dwc_update_left": dwc.update_left,
        }
        report.rounds.append(row)
        if on_round:
            on_round(row)
        if not config.restart:
            cloud_student = merged
    if config.ablations:
        report.ablations = ablations(config, teacher, student, first_stream, calib, target_test, work, akd_cfg,
                                     report, say)
    report.seconds = time.perf_counter() - t0
    (out / "report.json").write_text(json.dumps(report.as_dict(), indent=1) + "\n")
    write_plots(report, out)
    (out / "report.md").write_text(render_markdown(report))
    return report


def ablations(config: DemoConfig, teacher: Path, student: Path, stream: list[dict[str, Any]], calib: Any,
              target_test: list[Example], work: Path, akd_cfg: Any, report: DemoReport, say: Stage) -> dict[str, Any]:
    """The paper's ablations on round 1's data, from the original student, evaluated in
    torch on the target test set (whole images)."""
    from cdcca_edge.cloud.akd_mm import distill_multimodal
    from cdcca_edge.core.artifact import compute_identity, open_artifact
    from cdcca_edge.runtime.multimodal import MultimodalModel
    from cdcca_edge.runtime.uts import collect

    abl = work / "ablations"
    abl.mkdir(exist_ok=True)
    original = work / "device-original"  # the student as first exported
    identity = compute_identity(open_artifact(original)).digest
    bundles = {}
    with MultimodalModel(original, backend=config.backend) as mm:
        for sel, how in (("uts", config.uts_selector), ("random", "random")):
            say(f"ablation: {how} selection on round 1's stream")
            rep = collect(mm, stream, calib, abl / f"uplink-{sel}.cdcu", identity, selector=how,  # type: ignore[arg-type]
                          seed=config.seed * 10_000 + 1)  # the draw of the random loop's round 1
            bundles[sel] = rep
    variants = {
        "akd": (akd_cfg, "uts"),
        "akd_random_selection": (akd_cfg, "random"),
        "pseudo_label_only": (replace(akd_cfg, kd_weight=0.0, feature_weight=0.0), "uts"),
        "logit_kd_only": (replace(akd_cfg, ce_weight=0.0, feature_weight=0.0), "uts"),
        # the cloud refines what UTS picked: labels the teacher is unsure of teach less
        "akd_teacher_weighted": (replace(akd_cfg, teacher_weighting="confidence"), "uts"),
    }
    out: dict[str, Any] = {"student_before": report.baseline["target_accuracy"],
                           "teacher": report.baseline["teacher_accuracy"], "variants": {}}
    first_adapter = None
    for name, (cfg, sel) in variants.items():
        say(f"ablation: {name}")
        anchor = [work / "uplink-anchor.cdcu"] if config.anchor else []  # as in the rounds
        res = distill_multimodal(teacher, student, anchor + [abl / f"uplink-{sel}.cdcu"], abl / name, cfg)
        out["variants"][name] = {
            "target_accuracy": torch_accuracy(Path(res.merged or ""), target_test),
            "selector": sel, "uplink_bytes": bundles[sel].bundle_bytes, "n_uploaded": bundles[sel].n_uploaded,
        }
        if name == "akd":
            first_adapter = abl / name
    r1 = report.rounds[0]
    out["downlink"] = {
        "dwc_delta_bytes": r1["downlink_bytes"],
        "fp16_adapter_bytes": _adapter_fp16_bytes(first_adapter) if first_adapter else None,
        "full_redownload_bytes": report.artifact_bytes,
    }
    return out


def write_plots(report: DemoReport, out: Path) -> None:
    """accuracy.png and bytes.png (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [0] + [r["round"] for r in report.rounds]
    tgt = [report.baseline["target_accuracy"]] + [r["target_accuracy"] for r in report.rounds]
    src = [report.baseline["source_accuracy"]] + [r["source_accuracy"] for r in report.rounds]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(rounds, tgt, "o-", label="student, target domain")
    ax.plot(rounds, src, "s-", label="student, source domain")
    ax.axhline(report.baseline["teacher_accuracy"], ls="--", c="grey", label="teacher, target domain")
    _save_plot(plt, fig, ax, rounds, "accuracy", out / "accuracy.png")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = np.array([r["round"] for r in report.rounds], dtype=float)
    ax.bar(x - 0.2, [r["uplink_bytes"] for r in report.rounds], 0.2, label="uplink (bundle)")
    ax.bar(x, [r["raw_input_bytes"] for r in report.rounds], 0.2, label="raw inputs seen")
    ax.bar(x + 0.2, [r["downlink_bytes"] for r in report.rounds], 0.2, label="downlink (delta)")
    ax.axhline(report.artifact_bytes, ls="--", c="grey", label="full re-download")
    ax.set_yscale("log")
    _save_plot(plt, fig, ax, x, "bytes", out / "bytes.png")


def _save_plot(plt: Any, fig: Any, ax: Any, rounds: Any, ylabel: str, path: Path) -> None:
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_xticks(rounds)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_markdown(report: DemoReport) -> str:
    b = report.baseline
    lines = [
        "# cdcca-edge demo report", "",
        f"Device: student bundle `{report.device_artifact}` ({report.artifact_bytes:,} bytes), backend "
        f"`{report.config['backend']}`; target domains {', '.join(TARGET_DOMAINS)}; "
        f"{report.config['stream']} inputs per round; total {report.seconds:.0f} s.", "",
        "| round | target acc | source acc | teacher acc | uplink B (% raw) | downlink B (% artefact) | patch s |",
        "|---|---|---|---|---|---|---|",
        f"| 0 | {b['target_accuracy']:.1%} | {b['source_accuracy']:.1%} | {b['teacher_accuracy']:.1%} | - | - | - |",
    ]
    for r in report.rounds:
        lines.append(
            f"| {r['round']} | {r['target_accuracy']:.1%} | {r['source_accuracy']:.1%} | {r['teacher_accuracy']:.1%} "
            f"| {r['uplink_bytes']:,} ({r['uplink_bytes'] / r['raw_input_bytes']:.1%}) "
            f"| {r['downlink_bytes']:,} ({r['downlink_bytes'] / r['artifact_bytes']:.1%}) | {r['patch_seconds']:.3f} |")
    lines += ["", "Each round the device sees a stream drawn half from the source domain and half from the "
              "target domains; the uploaded share that came from the target domains: "
              + ", ".join(f"round {r['round']} {r['uploaded_target_fraction']:.0%} of {r['n_uploaded']}"
                          for r in report.rounds) + ".", "",
              "![accuracy](accuracy.png) ![bytes](bytes.png)", ""]
    a = report.ablations
    if a:
        lines += ["## Ablations (round 1's data, from the original student; target accuracy in torch)", "",
                  "| variant | selection | uploads | uplink B | target acc |", "|---|---|---|---|---|",
                  f"| student before | - | - | - | {a['student_before']:.1%} |"]
        for name, v in a["variants"].items():
            lines.append(f"| {name} | {v['selector']} | {v['n_uploaded']} | {v['uplink_bytes']:,} "
                         f"| {v['target_accuracy']:.1%} |")
        lines.append(f"| teacher | - | - | - | {a['teacher']:.1%} |")
        d = a["downlink"]
        lines += ["", "| downlink | bytes |", "|---|---|", f"| DWC delta | {d['dwc_delta_bytes']:,} |",
                  f"| fp16 LoRA adapter | {d['fp16_adapter_bytes']:,} |",
                  f"| full re-download | {d['full_redownload_bytes']:,} |", ""]
    return "\n".join(lines) + "\n"
