"""`distill export`, `distill predict`, `distill register` and `distill audit`: checkpoints and model folders put to
use (and put to the test: how stealable they are, publish/audit.py)."""

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
    from publish.export import export

    manifest = export(Path(args.stage_dir), args.checkpoint, Path(args.out))
    print(f"exported {manifest.extra['checkpoint']} -> {Path(args.out) / manifest.extra['model_dir']} "
          f"(model folder and MLflow Model; metrics: {', '.join(sorted(manifest.metrics))})")
    return 0


def cmd_predict(args) -> int:
    from publish import predict

    if args.model.startswith(("runs:/", "models:/")):
        uri, _ = _store(args)
        with predict.mlflow_store(uri):
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
    for row in predict.rows(model, lines):
        print(predict.dumps(row))
    return 0


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


def add_parser(subparsers) -> None:
    """Add `distill export`, `distill predict`, `distill register` and `distill audit` to the CLI."""
    from publish.audit import add_arguments

    p = subparsers.add_parser("export", help="turn a training checkpoint into a model folder and MLflow Model")
    p.add_argument("stage_dir", metavar="RUN_DIR/STAGE", help="the stage directory holding the checkpoints")
    p.add_argument("--checkpoint", required=True, metavar="step-N", help="which checkpoint (complete ones only)")
    p.add_argument("--out", required=True, metavar="DIR", help="new folder: manifest.json and model/")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("predict", help="labels and scores for lines of text, through the MLflow Model")
    p.add_argument("model", metavar="MODEL_URI", help="model folder, stage or export directory, runs:/ or models:/")
    p.add_argument("input", nargs="?", default="-", metavar="FILE|-", help="one text per line (default: stdin)")
    _store_args(p)
    p.set_defaults(func=cmd_predict)

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
