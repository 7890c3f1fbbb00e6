"""AKD benchmark: how much of the teacher-student gap distillation closes on a shifted
domain, against single-loss baselines at equal steps, and what UTS selection adds over
random selection of the same number of uploads.

    python bench/akd.py [--seeds 5] [--skip-smollm2]

Writes bench/results/akd.json and the "akd" section of docs/benchmarks.md.

Two settings:
- tiny: the demo's shapes domain. Teacher (wider, deeper) trained on every domain, student
  trained on the source domain only (other colours, shapes); the device runs the student
  on target-domain inputs and uploads what UTS selects.
- SmolLM2: teacher SmolLM2-135M-Instruct; student = the teacher with every other layer
  removed (15 of 30), healed by fine-tuning on the teacher's own continuations of plain
  English (the source domain); shifted domain: short factual questions and arithmetic.

Metric: teacher agreement on held-out shifted-domain prompts that were never uploaded —
the fraction of the teacher's greedy answer tokens the student predicts (teacher-forced),
and the fraction of whole answers it reproduces. Gap closed = (after - before) /
(1 - before): the teacher agrees with itself on every token. Variants, same steps:
AKD (CE + logit KD + feature KD), label-only (pseudo-label CE), logit-KD-only.

Seeds (tiny setting): seed 0 is the one the settings were chosen on and gives the
single-seed table (and the adapter bench/dwc.py compresses); seeds 1..N draw other
streams, held-out prompts and training orders, with the same models, and give every
variant's mean with a 95% interval and the paired differences against AKD. The SmolLM2
setting runs once (one seed: its 15 steps take about 6 minutes a variant here);
``--skip-smollm2`` keeps the SmolLM2 figures already in bench/results/akd.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, machine, smollm2_hf_dir, update_section, write_results  # noqa: E402
from cdcca_edge.core.paths import cache_dir  # noqa: E402

VARIANTS = {
    "akd": dict(ce_weight=1.0, kd_weight=1.0, feature_weight=1.0),  # every term
    "paper": dict(ce_weight=1.0, kd_weight=0.0, feature_weight=1.0),  # the reference code's terms
    "label_only": dict(ce_weight=1.0, kd_weight=0.0, feature_weight=0.0),
    "logit_kd_only": dict(ce_weight=0.0, kd_weight=1.0, feature_weight=0.0),
}


def _prompts_tiny(domain: str, n: int, seed: int) -> list[str]:
    from cdcca_edge.demo.tiny import tiny_corpus

    out = []
    for s in tiny_corpus(n, seed=seed, domain=domain):  # type: ignore[arg-type]
        out.append(s.split("answer:")[0] + "answer:" if "answer:" in s else " ".join(s.split()[:4]))
    return out


COUNTRIES = [("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Germany", "Berlin"),
             ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Greece", "Athens"),
             ("Portugal", "Lisbon"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"),
             ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
             ("Chile", "Santiago"), ("Cuba", "Havana"), ("Russia", "Moscow"), ("China", "Beijing")]


def _prompts_shifted(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randrange(3)
        if k == 0:
            out.append(f"Question: What is the capital of {rng.choice(COUNTRIES)[0]}?\nAnswer:")
        elif k == 1:
            a, b = rng.randrange(2, 40), rng.randrange(2, 40)
            out.append(f"Question: What is {a} plus {b}?\nAnswer:")
        else:
            out.append(f"Question: Which country has {rng.choice(COUNTRIES)[1]} as its capital?\nAnswer:")
    return out


ENGLISH_SEEDS = ["The weather today", "My favourite book", "In the morning I", "The old house",
                 "Our school", "The market", "A good friend", "The river", "Last summer we",
                 "The city at night", "My grandmother", "The little dog", "At the station",
                 "The garden", "Every evening", "The new teacher"]


def _eval_samples(teacher, tok, prompts, max_new, device):
    from cdcca_edge.cloud.akd import Sample, pseudo_label

    samples = [Sample(id=str(i), prompt_ids=tok(p)["input_ids"]) for i, p in enumerate(prompts)]
    pseudo_label(teacher, samples, max_new, tok.eos_token_id, device)
    return samples


def _agreement_with(student_dir, adapter_dir, teacher, samples, device):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cdcca_edge.cloud.akd import agreement

    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return agreement(model.eval(), teacher, samples, device)


def _collect(student_dir, work, source_prompts, target_prompts, selector, rate, max_tokens, quant="f32"):
    """Export the student, calibrate on source prompts, collect over target prompts."""
    from cdcca_edge.converters.export import export
    from cdcca_edge.core.artifact import compute_identity, open_artifact
    from cdcca_edge.runtime import load
    from cdcca_edge.runtime.uts import calibrate, collect, read_inputs

    art = work / f"student-{quant}.gguf"
    if not art.exists():
        export(student_dir, art, "gguf", quant=quant, validate=False)
    ident = compute_identity(open_artifact(art)).digest
    inputs = work / "stream.jsonl"
    with open(inputs, "w") as f:
        for i, p in enumerate(target_prompts):
            f.write(json.dumps({"id": f"t{i}", "prompt": p}) + "\n")
    with load(art, n_ctx=512) as m:
        cal = calibrate(m, source_prompts, ident, rate=rate, max_tokens=max_tokens)
        rep = collect(m, read_inputs(inputs), cal, work / f"{selector}.cdcu", ident, selector=selector)
    return work / f"{selector}.cdcu", rep


def run_setting(name, teacher_dir, student_dir, source, target_stream, heldout, work, cfg_kwargs,
                rate, max_tokens, uts_vs_random=True):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cdcca_edge.cloud.akd import AKDConfig, distill

    device = torch.device("cpu")
    tok = AutoTokenizer.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    evals = _eval_samples(teacher, tok, heldout, cfg_kwargs["max_new_tokens"], device)
    before = _agreement_with(student_dir, None, teacher, evals, device)
    print(f"[{name}] before: {before}", file=sys.stderr)
    uts_bundle, uts_rep = _collect(student_dir, work, source, target_stream, "uts", rate, max_tokens)
    print(f"[{name}] UTS uploaded {uts_rep.n_uploaded}/{uts_rep.n_seen}", file=sys.stderr)
    res = {"before": before, "uploaded": uts_rep.n_uploaded, "seen": uts_rep.n_seen,
           "bundle_bytes": uts_rep.bundle_bytes, "variants": {}}
    for variant, weights in VARIANTS.items():
        t0 = time.perf_counter()
        cfg = AKDConfig(**{**cfg_kwargs, **weights})
        report = distill(teacher_dir, student_dir, [uts_bundle], work / f"adapter-{variant}", cfg)
        after = _agreement_with(student_dir, work / f"adapter-{variant}", teacher, evals, device)
        res["variants"][variant] = {
            "after": after, "steps": report.steps, "seconds": time.perf_counter() - t0,
            "losses": report.losses,
            "gap_closed_tokens": (after["token_agreement"] - before["token_agreement"]) / max(1e-9, 1 - before["token_agreement"]),
            "gap_closed_answers": (after["answer_match"] - before["answer_match"]) / max(1e-9, 1 - before["answer_match"]),
        }
        print(f"[{name}] {variant}: {after} ({report.steps} steps)", file=sys.stderr)
    if uts_vs_random:
        rnd_bundle, rnd_rep = _collect(student_dir, work, source, target_stream, "random", rate, max_tokens)
        cfg = AKDConfig(**cfg_kwargs)
        distill(teacher_dir, student_dir, [rnd_bundle], work / "adapter-random", cfg)
        after = _agreement_with(student_dir, work / "adapter-random", teacher, evals, device)
        res["random_selection"] = {"after": after, "uploaded": rnd_rep.n_uploaded,
                                   "bundle_bytes": rnd_rep.bundle_bytes}
        print(f"[{name}] AKD from random uploads: {after}", file=sys.stderr)
    return res


def heal_student(teacher_dir: Path, out: Path, steps: int, seed: int = 0) -> Path:
    """SmolLM2 with every other layer removed, healed on the teacher's continuations of
    plain English (CE, full fine-tuning)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    texts = []
    rng = random.Random(seed)
    for i in range(96):
        ids = tok(rng.choice(ENGLISH_SEEDS), return_tensors="pt").input_ids
        with torch.no_grad():
            gen = teacher.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=True,
                                   top_k=40, temperature=0.8, pad_token_id=tok.eos_token_id)
        texts.append(gen[0].tolist())
    student = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    student.model.layers = torch.nn.ModuleList(list(student.model.layers)[::2])
    student.config.num_hidden_layers = len(student.model.layers)
    for i, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = i
    opt = torch.optim.AdamW(student.parameters(), lr=5e-5)
    student.train()
    for step in range(steps):
        batch = [texts[(step * 8 + j) % len(texts)] for j in range(8)]
        n = max(len(b) for b in batch)
        ids = torch.full((8, n), tok.eos_token_id)
        mask = torch.zeros((8, n), dtype=torch.long)
        for j, b in enumerate(batch):
            ids[j, : len(b)] = torch.tensor(b)
            mask[j, : len(b)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = student(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0:
            print(f"  heal step {step}: loss {float(loss):.3f}", file=sys.stderr)
    student.eval()
    student.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_inputs(seed: int) -> tuple[list[str], list[str], list[str]]:
    """(source prompts for calibration, the device's stream, held-out target prompts) of
    the tiny setting; seed 0 is the original draw, others are 1,000 apart."""
    o = 1000 * seed
    return (_prompts_tiny("source", 60, 1 + o),
            _prompts_tiny("target", 200, 2 + o) + _prompts_tiny("source", 200, 3 + o),
            _prompts_tiny("target", 120, 4 + o))


TINY_AKD = dict(epochs=8, lr=3e-3, batch_size=8, max_new_tokens=8)


def summarise_seeds(runs: list[dict]) -> dict:
    """Per variant: token agreement and answer match over seeds (mean, 95% interval), and
    the paired differences against AKD; UTS minus random selection, same AKD."""
    from dataclasses import asdict

    from cdcca_edge.demo.seeds import Interval

    out: dict = {"seeds": [r["seed"] for r in runs], "variants": {}}
    for v in runs[0]["variants"]:
        row = {}
        for m in ("token_agreement", "answer_match", "teacher_kl"):
            vals = [r["variants"][v]["after"][m] for r in runs]
            ref = [r["variants"]["akd"]["after"][m] for r in runs]
            row[m] = asdict(Interval.of(vals))
            row[f"{m}_minus_akd"] = asdict(Interval.of([a - b for a, b in zip(vals, ref)]))
        out["variants"][v] = row
    metrics = ("token_agreement", "answer_match", "teacher_kl")
    out["before"] = {m: asdict(Interval.of([r["before"][m] for r in runs])) for m in metrics}
    out["uts_minus_random"] = {
        m: asdict(Interval.of([r["variants"]["akd"]["after"][m] - r["random_selection"]["after"][m] for r in runs]))
        for m in metrics}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-smollm2", action="store_true",
                    help="do not run the SmolLM2 setting; keep its figures already on record")
    ap.add_argument("--seeds", type=int, default=5, help="tiny setting: seeds 1..N for the intervals")
    ap.add_argument("--heal-steps", type=int, default=60)
    ap.add_argument("--render", action="store_true", help="only re-render docs from bench/results/akd.json")
    args = ap.parse_args()
    if args.render:
        doc = json.loads((RESULTS / "akd.json").read_text())
        if "tiny_seeds" in doc:
            runs = doc["tiny_seeds"]["runs"]
            doc["tiny_seeds"] = {**summarise_seeds(runs), "runs": runs}
            write_results("akd", doc)
        render(doc)
        return

    from cdcca_edge.demo.tiny import TinySpec, build_tiny_model

    work = cache_dir() / "bench" / "akd"
    work.mkdir(parents=True, exist_ok=True)
    doc: dict = {"machine": machine()}

    # --- tiny ----------------------------------------------------------------------------
    tw = work / "tiny"
    tw.mkdir(exist_ok=True)
    teacher = tw / "teacher"
    student = tw / "student"
    if not (teacher / "config.json").exists():
        build_tiny_model(teacher, TinySpec(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                           num_attention_heads=4, num_key_value_heads=2, domain="all",
                                           seed=11, train_steps=600))
    if not (student / "config.json").exists():
        build_tiny_model(student, TinySpec(domain="source", seed=12, train_steps=400))
    doc["tiny"] = run_setting("tiny", teacher, student, *tiny_inputs(0), tw, dict(TINY_AKD, seed=0),
                              rate=0.1, max_tokens=8)
    runs = []
    for seed in range(1, args.seeds + 1):
        sd = tw / f"seed-{seed}"
        sd.mkdir(exist_ok=True)
        r = run_setting(f"tiny seed {seed}", teacher, student, *tiny_inputs(seed), sd, dict(TINY_AKD, seed=seed),
                        rate=0.1, max_tokens=8)
        r["seed"] = seed
        runs.append(r)
    if runs:
        doc["tiny_seeds"] = summarise_seeds(runs)
        doc["tiny_seeds"]["runs"] = runs

    # --- SmolLM2 -------------------------------------------------------------------------
    if not args.skip_smollm2:
        sw = work / "smollm2"
        sw.mkdir(exist_ok=True)
        hf = smollm2_hf_dir()
        student = heal_student(hf, sw / "student-15-layers", args.heal_steps)
        doc["smollm2"] = run_setting(
            "smollm2", hf, student, [f"{s} and" for s in ENGLISH_SEEDS] * 2,
            _prompts_shifted(64, 2) + [f"{s} and" for s in ENGLISH_SEEDS * 4], _prompts_shifted(40, 9),
            sw, dict(epochs=3, lr=1e-3, batch_size=8, max_new_tokens=6, seed=0, feature_weight=0.1),
            rate=0.1, max_tokens=6, uts_vs_random=False,
        )
        doc["smollm2"]["heal_steps"] = args.heal_steps
    elif (RESULTS / "akd.json").exists() and "smollm2" in json.loads((RESULTS / "akd.json").read_text()):
        doc["smollm2"] = json.loads((RESULTS / "akd.json").read_text())["smollm2"]
        doc["smollm2"]["carried_over"] = "not re-run (--skip-smollm2): the figures of the previous run"

    write_results("akd", doc)
    render(doc)


def render(doc: dict) -> None:
    """The "akd" section of docs/benchmarks.md."""
    lines = []
    for setting in ("tiny", "smollm2"):
        if setting not in doc:
            continue
        r = doc[setting]
        b = r["before"]
        if r.get("carried_over"):
            setting += " (previous run)"
        lines.append(f"| {setting} | before | {b['token_agreement']:.1%} | {b['answer_match']:.1%} | "
                     f"{b['teacher_kl']:.3f} | | |")
        for v, x in r["variants"].items():
            a = x["after"]
            lines.append(f"| {setting} | {v} ({x['steps']} steps) | {a['token_agreement']:.1%} | "
                         f"{a['answer_match']:.1%} | {a['teacher_kl']:.3f} | {x['gap_closed_tokens']:.0%} | "
                         f"{x['gap_closed_answers']:.0%} |")
    rs = doc["tiny"].get("random_selection")
    uts_line = ""
    if rs:
        akd = doc["tiny"]["variants"]["akd"]["after"]
        uts_line = (f"\nSame AKD, same number of uploads ({rs['uploaded']}), tiny setting: from UTS-selected "
                    f"samples the student reaches {akd['token_agreement']:.1%} token agreement "
                    f"({akd['answer_match']:.1%} answers); from randomly selected ones "
                    f"{rs['after']['token_agreement']:.1%} ({rs['after']['answer_match']:.1%}).\n")
    seeds_md = ""
    if "tiny_seeds" in doc:
        from cdcca_edge.demo.seeds import Interval

        ts = doc["tiny_seeds"]
        def nats(iv: Interval) -> str:
            return f"{iv.mean:+.3f} [{iv.lo:+.3f}, {iv.hi:+.3f}]"

        rows = []
        for v, row in [("before", None)] + list(ts["variants"].items()):
            src = ts["before"] if row is None else row
            tok, ans = (Interval.from_dict(src[m]) for m in ("token_agreement", "answer_match"))
            kl = Interval.from_dict(src["teacher_kl"]) if "teacher_kl" in src else None
            kl_s = "" if kl is None else f"{kl.mean:.3f} [{kl.lo:.3f}, {kl.hi:.3f}]"
            diff = " | | " if row is None else (
                f"{Interval.from_dict(row['token_agreement_minus_akd']).points()} | "
                f"{Interval.from_dict(row['answer_match_minus_akd']).points()} | "
                + (nats(Interval.from_dict(row["teacher_kl_minus_akd"])) if "teacher_kl_minus_akd" in row else ""))
            rows.append(f"| {v} | {tok.percent()} | {ans.percent()} | {kl_s} | {diff} |")
        um = {m: Interval.from_dict(ts["uts_minus_random"][m]) for m in ("token_agreement", "answer_match")}
        seeds_md = f"""
Tiny setting over seeds {ts['seeds'][0]}-{ts['seeds'][-1]} (each: its own stream, held-out prompts and
training order; same models): mean [95% interval], and each variant minus AKD on the same
seed, in points.

| variant | token agreement | answer match | KL(teacher ‖ student) | minus AKD (tokens) | minus AKD (answers) | minus AKD (KL, nats) |
|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

UTS minus random selection (same AKD, same number of uploads): tokens
{um['token_agreement'].points()}, answers {um['answer_match'].points()} points.
"""
    md = f"""## AKD: distillation on the shifted domain (`bench/akd.py`)

Teacher agreement of the student on held-out shifted-domain prompts that were never
uploaded (tokens: teacher-forced top-1; answers: whole greedy answers reproduced; KL: mean
KL(teacher ‖ student) over the answer positions, nats). Gap closed = (after - before) /
(100% - before). Variants use the same uploads and steps: `akd` = CE + logit KD + feature
KD, `paper` = CE + feature KD (the reference code's terms), `label_only` = CE on the
teacher's pseudo-labels, `logit_kd_only` = logit KD.

| setting | student | token agreement | answer match | KL(teacher ‖ student) | gap closed (tokens) | gap closed (answers) |
|---|---|---:|---:|---:|---:|---:|
{chr(10).join(lines)}
{uts_line}{seeds_md}"""
    update_section("akd", md)
    print("wrote bench/results/akd.json and docs/benchmarks.md", file=sys.stderr)
    print(md)


if __name__ == "__main__":
    main()
