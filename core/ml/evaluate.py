"""Score generated images of a subject: DINO, CLIP-I, CLIP-T and FID.

    python -m core.ml.evaluate --generated var/demo/<job> --real demo/sample_subject \\
        --prompts "a photo of sks woman in a wizard robe" --subject-token sks --class-noun woman \\
        [--reference DIR] [--metrics dino,clip_i,clip_t,fid] [--json OUT]
        [--clip-model ViT-L-14] [--clip-weights PATH] [--dino-weights PATH]
        [--inception-weights PATH] | [--random-weights]

Weights come from the flags or ``ATELIER_EVAL_{CLIP,DINO,INCEPTION}_WEIGHTS`` (and
``ATELIER_EVAL_CLIP_MODEL``); they are never downloaded. ``--random-weights`` runs
the same models with seeded random weights, to check the plumbing only. Prints a
table and writes JSON (``--json``, else ``var/eval/evaluation-<time>.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from core.errors import AtelierError, InvalidInput
from core.ml.eval_models import MetricModels
from core.ml.evaluation import (
    METRICS,
    RANDOM_WEIGHTS_WARNING,
    EvaluationReport,
    clean_prompt,
    evaluate,
    load_images,
    read_prompts,
)

LABELS = {
    "dino": "DINO",
    "dino_real_vs_real": "DINO real/real",
    "clip_i": "CLIP-I",
    "clip_i_real_vs_real": "CLIP-I real/real",
    "clip_t": "CLIP-T",
    "fid": "FID",
}
BANNER = f"!!! {RANDOM_WEIGHTS_WARNING.upper()} !!!"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m core.ml.evaluate",
        description="DINO / CLIP-I / CLIP-T (as in DreamBooth) and FID of generated images.",
    )
    p.add_argument("--generated", type=Path, required=True, help="directory of generated images")
    p.add_argument("--real", type=Path, required=True, help="directory of the subject's photos")
    p.add_argument(
        "--prompts",
        help="a prompt, or a file: one prompt per line (or one for all), or JSON (list, "
        "or file name -> prompt); needed for clip_t",
    )
    p.add_argument("--reference", type=Path, help="reference set for FID (default: --real)")
    p.add_argument("--subject-token", help="the rare token, replaced by the class noun for CLIP-T")
    p.add_argument("--class-noun", default="person", help="default: person")
    p.add_argument(
        "--metrics",
        default=",".join(METRICS),
        help=f"comma-separated subset of {','.join(METRICS)} (default: all)",
    )
    p.add_argument("--clip-model", help="open_clip model name (default ViT-L-14)")
    p.add_argument("--clip-weights", type=Path, help="open_clip checkpoint file or directory")
    p.add_argument("--dino-weights", type=Path, help="DINO ViT-S/16 checkpoint file or directory")
    p.add_argument("--inception-weights", type=Path, help="inception_v3 state dict file")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="seeded random weights (plumbing check only: the numbers mean nothing)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", type=Path, dest="json_out", help="where to write the JSON report")
    return p


def format_table(report: EvaluationReport) -> str:
    rows = [("metric", "value", "n gen / ref", "DreamBooth SD (paper)", "note")]
    for m in report.metrics:
        value = "n/a" if m.value is None else f"{m.value:.4f}"
        paper = "" if m.paper_sd is None else f"{m.paper_sd:.3f}"
        rows.append(
            (
                LABELS.get(m.name, m.name),
                value,
                f"{m.n_generated} / {m.n_reference}",
                paper,
                m.note or "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4]
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0].rstrip()))
    return "\n".join(line.rstrip() for line in lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    metrics = tuple(m.strip().replace("-", "_") for m in args.metrics.split(",") if m.strip())
    models = MetricModels.from_env(
        clip_model=args.clip_model,
        clip_weights=args.clip_weights,
        dino_weights=args.dino_weights,
        inception_weights=args.inception_weights,
        random_weights=args.random_weights,
        seed=args.seed,
        device=args.device,
        batch_size=args.batch_size,
    )
    if models.random_weights:
        print(BANNER, flush=True)
    try:
        generated = load_images(args.generated)
        real = load_images(args.real)
        reference = load_images(args.reference) if args.reference else None
        prompts = None
        if "clip_t" in metrics:
            if not args.prompts:
                raise InvalidInput("clip_t needs --prompts (or leave clip_t out of --metrics)")
            raw = read_prompts(args.prompts, [g.name for g in generated])
            prompts = [clean_prompt(p, args.subject_token, args.class_noun) for p in raw]
        report = evaluate(models, generated, real, prompts, reference, metrics)
    except AtelierError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 2
    payload = report.to_json()
    payload.update(
        generated=str(args.generated),
        real=str(args.real),
        fid_reference=str(args.reference or args.real),
        subject_token=args.subject_token,
        class_noun=args.class_noun,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    out = args.json_out or Path("var/eval") / f"evaluation-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")

    print(format_table(report))
    for note in report.notes:
        if note != RANDOM_WEIGHTS_WARNING:
            print(f"note: {note}")
    if report.random_weights:
        print(BANNER)
    print(f"json: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
