"""`distill export`, `distill predict`, `distill eval`, `distill register` and `distill audit`: checkpoints and model
folders put to use (and put to the test: how stealable they are, publish/audit.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.manifest import MANIFEST, Manifest, atomic_write_text, manifest_sha256
from pipeline.tracking.lineage import RUN_ID_FILE
from pipeline.tracking.promote import parse_gate
from pipeline.tracking.store import connect, sqlite_uri, store_uri


def _store(args) -> tuple[str, object]:
    """(uri, client) of the store the flags name: --tracking-uri, --run-dir's sqlite, else MLFLOW_TRACKING_URI."""
    given = args.tracking_uri or (sqlite_uri(Path(args.run_dir)) if args.run_dir else None)
    uri = store_uri(given, None)
    return uri, connect(uri, args.timeout)


def cmd_export(args) -> int:
    from publish.export import export, export_subnetwork

    if (args.width is None) != (args.depth is None):
        raise ConfigError("export: give --width and --depth together (a dynabert sub-network)")
    if (args.checkpoint is None) == (args.width is None):
        raise ConfigError("export: give --checkpoint step-N, or --width W --depth D for a dynabert stage (not both)")
    if args.width is not None:
        manifest = export_subnetwork(Path(args.stage_dir), args.width, args.depth, Path(args.out))
        what = f"{args.stage_dir} width {args.width:g} depth {args.depth:g}"
    else:
        manifest = export(Path(args.stage_dir), args.checkpoint, Path(args.out))
        what = manifest.extra["checkpoint"]
    print(f"exported {what} -> {Path(args.out) / manifest.extra['model_dir']} "
          f"(model folder and MLflow Model; metrics: {', '.join(sorted(manifest.metrics))})")
    return 0


def cmd_predict(args) -> int:
    from publish import predict
    from publish.early_exit_classifier import check_speed

    if check_speed(args.speed, args.model) is not None:
        model = None
    elif args.model.startswith(("runs:/", "models:/")):
        from publish.classifier import mlflow_uris

        uri, _ = _store(args)
        with mlflow_uris(uri):
            model = predict.load(args.model)
    else:
        model = predict.load(args.model)
    if args.input == "-":
        lines = sys.stdin.readlines()
    else:
        try:
            lines = Path(args.input).read_text().splitlines()
        except OSError as err:
            raise ConfigError(f"{args.input}: cannot read it ({err.strerror})") from None
    if model is None:
        from publish import classifier

        early = classifier.load(args.model)
        early.with_speed(args.speed)  # refuses (one line) a folder that is not early-exit
        found = predict.early_exit_rows(early, lines)
    else:
        found = predict.rows(model, lines)
    for row in found:
        print(predict.dumps(row))
    return 0


def cmd_eval(args) -> int:
    from publish import evaluate

    return evaluate.main(args, lambda: _store(args)[0])


def _experiment(client, run_dir: Path | None) -> str:
    found = client.get_experiment_by_name("distill")
    if found is not None:
        return found.experiment_id
    location = (run_dir.resolve() / "mlartifacts").as_uri() if run_dir else None
    return client.create_experiment("distill", artifact_location=location)


def cmd_register(args) -> int:
    from pipeline.tracking.models import ModelRegistry, version_tags

    for gate in args.require:
        parse_gate(gate)  # a malformed gate fails before anything is registered
    folder = Path(args.folder)
    manifest = Manifest.load(folder)
    manifest.verify(folder)
    model_dir = manifest.extra.get("model_dir")
    if not model_dir or not (folder / model_dir).is_dir():
        raise ConfigError(f"{folder}: its manifest names no model folder (extra.model_dir); register a stage or "
                          "an export that saved a model")
    _, client = _store(args)
    made: list[str] = []

    def own_run() -> str:  # a run for a folder no run of this store logged (an export, a copied stage)
        experiment = _experiment(client, Path(args.run_dir) if args.run_dir else None)
        tags = {"distill.stage": manifest.stage, "distill.registered_from": str(folder.resolve())}
        run_id = client.create_run(experiment, run_name=manifest.name, tags=tags).info.run_id
        client.log_artifact(run_id, str(folder / MANIFEST))
        atomic_write_text(folder / RUN_ID_FILE, run_id + "\n")
        client.log_artifact(run_id, str(folder / RUN_ID_FILE))
        made.append(run_id)
        return run_id

    registry = ModelRegistry(client, own_run)
    key = f"manifest:{manifest_sha256(folder)}"
    version, created = registry.register(args.name, folder, model_dir, key, version_tags(folder),
                                         args.description or None)
    for run_id in made:
        client.set_terminated(run_id, "FINISHED")
    said = "registered" if created else "already registered as"
    print(f"{said} {args.name} version {version.version} "
          f"(models:/{args.name}/{version.version}, source {version.source})")
    if args.alias:  # a refusal is a PromotionRefused: exit 2 with the failing gates, the version kept
        print(registry.promote(args.name, version, args.alias, args.require))
    return 0


def cmd_audit(args) -> int:
    from publish.audit import run_audit

    report = run_audit(args, lambda: _store(args)[0])
    print(report.read_text())
    print(f"report: {report} (report.json, extract.png beside it)")
    return 0


def _store_args(parser) -> None:
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--run-dir", help="use the embedded store of this run directory")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server")


def evaluate_parser(subparsers) -> None:
    """`distill eval MODEL DATA`: the flags (see publish/evaluate.py)."""
    p = subparsers.add_parser("eval", help="score a model on a labelled file: metrics, confusion matrix, latency, "
                                           "retention against a teacher")
    p.add_argument("model", metavar="MODEL", help="model folder, stage or export directory, @stage (with --run-dir), "
                                                  "runs:/ or models:/NAME@ALIAS")
    p.add_argument("data", metavar="DATA", help="labelled .tsv, .csv or .jsonl file (or hf:DIR[:split])")
    p.add_argument("--teacher", metavar="MODEL", help="also score this model and report retention and speed-up")
    p.add_argument("--task", help="GLUE preset for the columns and metrics (sst2, mrpc, ...); default: custom")
    p.add_argument("--text-column", action="append", default=[], metavar="COLUMN",
                   help="text column (twice for sentence pairs; default: the preset's, else 'sentence')")
    p.add_argument("--label-column", default="", help="label column (default: the preset's, else 'label')")
    p.add_argument("--metric", action="append", default=[], metavar="NAME",
                   help="metric to report (repeatable; default: the preset's, else accuracy)")
    p.add_argument("--max-length", type=int, default=128, help="longest tokenized input")
    p.add_argument("--limit", type=int, help="score only the first N rows")
    p.add_argument("--batch-size", type=int, default=64, help="examples per forward")
    p.add_argument("--latency-batch-size", type=int, default=32, help="batch size of the latency measurement")
    p.add_argument("--latency-seq-len", type=int, default=64, help="sequence length of the latency measurement")
    p.add_argument("--latency-repeats", type=int, default=10, help="timed repeats (median reported)")
    p.add_argument("--speed", type=float, metavar="S",
                   help="FastBERT early exit at speed threshold S in [0, 1] (a fastbert stage directory; default: "
                        "its saved speed; 0: full model)")
    p.add_argument("--out", metavar="DIR", help="write eval.json and the confusion-matrix PNG(s) here")
    _store_args(p)
    p.set_defaults(func=cmd_eval)


def add_parser(subparsers) -> None:
    """Add `distill export`, `distill predict`, `distill eval`, `distill register` and `distill audit` to the CLI."""
    from publish.audit import add_arguments

    p = subparsers.add_parser("export", help="turn a training checkpoint into a model folder and MLflow Model")
    p.add_argument("stage_dir", metavar="RUN_DIR/STAGE", help="the stage directory holding the checkpoints")
    p.add_argument("--checkpoint", metavar="step-N", help="which checkpoint (complete ones only)")
    p.add_argument("--width", type=float, metavar="W", help="dynabert stage: the sub-network's width multiplier")
    p.add_argument("--depth", type=float, metavar="D", help="dynabert stage: the sub-network's depth multiplier")
    p.add_argument("--out", required=True, metavar="DIR", help="new folder: manifest.json and model/")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("predict", help="labels and scores for lines of text, through the MLflow Model")
    p.add_argument("model", metavar="MODEL_URI", help="model folder, stage or export directory, runs:/ or models:/")
    p.add_argument("input", nargs="?", default="-", metavar="FILE|-", help="one text per line (default: stdin)")
    p.add_argument("--speed", type=float, metavar="S",
                   help="FastBERT early exit at speed threshold S in [0, 1] (a fastbert stage directory; 0: full model)")
    _store_args(p)
    p.set_defaults(func=cmd_predict)

    evaluate_parser(subparsers)

    p = subparsers.add_parser("register", help="register a stage's or an export's model folder as a model version")
    p.add_argument("folder", metavar="DIR", help="a finished stage directory or a `distill export` folder")
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--alias", help="alias to move to the version if every gate holds (e.g. champion)")
    p.add_argument("--require", action="append", default=[], metavar="GATE",
                   help="gate that must hold to move the alias, e.g. 'eval_mlm_accuracy>=0.3' (repeatable)")
    p.add_argument("--description", default="", help="description stored with the version")
    _store_args(p)
    p.set_defaults(func=cmd_register)

    p = subparsers.add_parser("audit", help="how stealable a promoted model is: extraction, detector, watermark")
    add_arguments(p)
    _store_args(p)
    p.set_defaults(func=cmd_audit)
