"""`cdcca-edge distill`: AKD in the cloud, from uplink bundles to a PEFT adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cdcca_edge.cli._output import out, print_json, stage_progress
from cdcca_edge.cli.options import KD, Adapter, JsonOpt, TeacherWeight, value
from cdcca_edge.cloud.akd import AKDConfig

_AKD = AKDConfig()  # the defaults shown are the library's


def distill(
    teacher: Annotated[Path, typer.Option(help="Teacher HF model directory (cloud).")],
    student: Annotated[Path, typer.Option(help="Student HF model directory (the device's model).")],
    bundle: Annotated[list[Path], typer.Option(help="Uplink bundle (.cdcu); repeatable.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output: the PEFT adapter directory.")],
    adapter: Annotated[Adapter, typer.Option(help="lora, or bias-norm (LN tuning + bias terms).")] = Adapter(_AKD.adapter),
    epochs: Annotated[int, typer.Option(help="Passes over the uploaded samples.")] = _AKD.epochs,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = _AKD.lr,
    batch_size: Annotated[int, typer.Option(help="Samples per step.")] = _AKD.batch_size,
    max_new_tokens: Annotated[int, typer.Option(help="Teacher pseudo-label length.")] = _AKD.max_new_tokens,
    ce_weight: Annotated[float, typer.Option(help="Weight of CE on teacher pseudo-labels.")] = _AKD.ce_weight,
    kd_weight: Annotated[float, typer.Option(help="Weight of logit KD.")] = _AKD.kd_weight,
    kd_loss: Annotated[KD, typer.Option(help="Logit KD divergence.")] = KD(_AKD.kd_loss),
    kd_temperature: Annotated[float, typer.Option(help="KD softmax temperature.")] = _AKD.kd_temperature,
    teacher_weighting: Annotated[TeacherWeight, typer.Option(
        help="confidence: weigh each answer token's CE and KD by the teacher's probability of it; "
             "none: all alike (the paper's loss).")] = TeacherWeight(_AKD.teacher_weighting),
    device_kd: Annotated[bool, typer.Option(
        "--device-kd/--no-device-kd", help="Also KD on the device's uploaded answers, token-weighted.")
    ] = _AKD.kd_on_device_answer,
    feature_weight: Annotated[float, typer.Option(help="Weight of last-hidden-state feature KD.")] = _AKD.feature_weight,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = _AKD.lora_r,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = _AKD.lora_alpha,
    target_modules: Annotated[Optional[str], typer.Option(
        help="LoRA targets, comma-separated (default: all projections).")] = None,
    holdout: Annotated[float, typer.Option(help="Fraction of samples held out for the report.")] = _AKD.holdout,
    seed: Annotated[int, typer.Option(help="Seed: same inputs and seed, same adapter.")] = _AKD.seed,
    merge: Annotated[bool, typer.Option("--merge", help="Also write the merged model to OUTPUT/merged.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """AKD: distil the teacher into a PEFT adapter on the student, from uplink bundles
    (LLaVA teacher and student: on the bundles' visual tokens)."""
    from cdcca_edge.cloud.akd import distill as run_distill

    cfg = AKDConfig(
        adapter=value(adapter), lora_r=lora_r, lora_alpha=lora_alpha,
        target_modules=tuple(target_modules.split(",")) if target_modules else _AKD.target_modules,
        epochs=epochs, lr=lr, batch_size=batch_size, max_new_tokens=max_new_tokens,
        ce_weight=ce_weight, kd_weight=kd_weight, kd_loss=value(kd_loss), kd_temperature=kd_temperature,
        kd_on_device_answer=device_kd, teacher_weighting=value(teacher_weighting), feature_weight=feature_weight,
        holdout=holdout, seed=seed,
    )
    with stage_progress(json_out) as tick:
        report = run_distill(teacher, student, bundle, output, cfg, merge=merge, progress=tick)
    if json_out:
        print_json(report.as_dict())
    elif hasattr(report, "kept_token_fraction"):
        _print_multimodal(output, report)
    else:
        _print_text(output, report)


def _print_multimodal(output: Path, mm: Any) -> None:
    out.print(f"{output}: lora adapter on the language model and projector, {mm.trainable_params:,} "
              f"trainable parameters, {mm.steps} steps on {mm.n_train} image samples "
              f"({mm.kept_token_fraction:.0%} of visual tokens kept) [{mm.seconds:.1f} s]", highlight=False)
    for split in ("bundle", "holdout"):
        out.print(f"  teacher answer agreement on {split}: {mm.agreement_before[split]:.1%} -> "
                  f"{mm.agreement_after[split]:.1%}", highlight=False)


def _print_text(output: Path, report: Any) -> None:
    b, a = report.agreement_before, report.agreement_after
    out.print(f"{output}: {report.config['adapter']} adapter, {report.trainable_params:,} trainable "
              f"parameters, {report.steps} steps on {report.n_train} samples [{report.seconds:.1f} s]",
              highlight=False)
    for split in ("bundle", "holdout"):
        out.print(f"  teacher agreement on {split}: tokens {b[split]['token_agreement']:.1%} -> "
                  f"{a[split]['token_agreement']:.1%}, answers {b[split]['answer_match']:.1%} -> "
                  f"{a[split]['answer_match']:.1%}", highlight=False)
    if report.merged:
        out.print(f"  merged model: {report.merged}", highlight=False)
