"""`distill audit MODEL_URI`: how stealable a promoted model is, with small defaults.

The model (`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/ID[/path]`, or a model folder / stage
directory) is fetched to `OUT/victim/`, then a one-stage recipe `OUT/audit.yaml` runs the `extract` stage on it
into `OUT/run/`: served with `mlflow models serve` on 127.0.0.1 behind the watermarking deployment, asked
random-word queries at 0.1x the training set's size, stolen by a pretrained student, and the detector and the
watermark measured. The report is printed and kept in `OUT/run/extract/report.md`. A rerun of the same
command resumes (journaled answers are not asked again, finished students are not trained again).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from pipeline.config import ConfigError


def fetch(model: str, out: Path, store_uri) -> Path:
    """A local MLflow Model folder holding `model`: downloaded once into `out/victim/` for runs:/ and
    models:/ (through the store `store_uri()` names), the folder itself otherwise."""
    from publish.predict import model_uri

    uri = model_uri(model)
    if not uri.startswith(("runs:/", "models:/")):
        return Path(uri).resolve()
    target = out / "victim"
    if (target / "MLmodel").is_file():
        return target.resolve()
    import mlflow

    from publish.classifier import mlflow_uris

    staging = out / ".tmp-victim"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with mlflow_uris(store_uri()):
        try:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(staging)))
        except Exception as err:  # noqa: BLE001 - MLflow raises many types; the first line says what is wrong
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConfigError(f"{model}: MLflow could not fetch it ({first[:300]})") from None
    if not (got / "MLmodel").is_file():
        raise ConfigError(f"{model}: what MLflow fetched is not an MLflow Model folder (no MLmodel)")
    got.rename(target)
    shutil.rmtree(staging, ignore_errors=True)
    return target.resolve()


def recipe(args, victim: Path) -> dict:
    """The one-stage recipe the audit runs (the flags fill the stage's keys; `--set` changes any other)."""
    test = str(Path(args.test).resolve())
    data = {"task": "custom", "train": str(Path(args.train).resolve()), "dev": test, "test": test,
            "text_columns": args.text_column or ["sentence"], "label_column": args.label_column, "metrics": ["accuracy"],
            "max_length": args.max_length}
    stage = {"victim_path": str(victim), "data": data, "corpus_path": str(Path(args.corpus).resolve()),
             "generators": args.generator or ["random"], "budgets": args.budget or [0.1],
             "student_path": args.student, "watermark_fraction": args.watermark_fraction, "epochs": 3,
             "detector_samples": 1000, "corpus_max_sentences": 20000}
    if args.watermark_key:
        stage["watermark_key_file"] = str(Path(args.watermark_key).resolve())
    return {"run": {"name": "audit", "seed": 0}, "tracking": {"enabled": args.track}, "stages": {"extract": stage}}


def run_audit(args, store_uri) -> Path:
    """Fetch the model, write and run the audit recipe; return the report's path."""
    from pipeline.recipe import load_recipe
    from pipeline.runner import run_recipe

    for name in ("train", "test", "corpus"):
        if not Path(getattr(args, name)).is_file():
            raise ConfigError(f"--{name} {getattr(args, name)}: no such file")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    victim = fetch(args.model, out, store_uri)
    path = out / "audit.yaml"
    path.write_text(yaml.safe_dump(recipe(args, victim), sort_keys=False))
    run_recipe(load_recipe(path, args.overrides), out / "run")
    return out / "run" / "extract" / "report.md"


def add_arguments(p) -> None:
    """The flags of `distill audit`."""
    p.add_argument("model", metavar="MODEL_URI", help="models:/NAME@ALIAS, runs:/ID, or a model folder / stage dir")
    p.add_argument("--train", required=True, help="the model's real training set (its size sets the budgets; "
                   "its texts are the detector's real queries)")
    p.add_argument("--test", required=True, help="labelled held-out file the model never trained on")
    p.add_argument("--corpus", required=True, help="text file, one sentence a line (.gz allowed): query words")
    p.add_argument("--text-column", action="append", default=None, help="text column(s) (default: sentence)")
    p.add_argument("--label-column", default="label", help="label column (default: label)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per query at most")
    p.add_argument("--budget", type=float, action="append", help="query budget, x training set (default 0.1)")
    p.add_argument("--generator", action="append", choices=["random", "corpus"], help="default: random")
    p.add_argument("--student", default="pkg:cognition/model", help="the attacker's pretrained encoder")
    p.add_argument("--watermark-fraction", type=float, default=0.02, help="share of answers watermarked")
    p.add_argument("--watermark-key", help="watermark key file (default: OUT/run/watermark.key, made if missing)")
    p.add_argument("--out", default="audit", help="folder for the fetched model, recipe and run (default: audit)")
    p.add_argument("--track", action="store_true", help="track the audit run in OUT/run's MLflow store")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any other extract key, e.g. --set stages.extract.answers=top1_prob")
