"""`distill promote` and `distill track replay`: the tracking verbs of the CLI."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import ConfigError
from pipeline.tracking.base import TrackingConfig
from pipeline.tracking.promote import find_version, promote
from pipeline.tracking.store import connect, sqlite_uri, store_uri


def _client(args):
    # --run-dir names that run's embedded store as explicitly as --tracking-uri names a server.
    given = args.tracking_uri or (sqlite_uri(Path(args.run_dir)) if args.run_dir else None)
    return connect(store_uri(given, None), args.timeout)


def cmd_promote(args) -> int:
    client = _client(args)
    version = find_version(client, args.name, args.version, args.run)
    print(promote(client, args.name, version, args.alias, args.require))
    return 0


def cmd_replay(args) -> int:
    from pipeline.tracking.mlflow_tracker import BUFFER, MlflowTracker

    run_dir = Path(args.run_dir)
    if not (run_dir / BUFFER).is_file():
        raise ConfigError(f"{run_dir / BUFFER}: nothing to replay")
    config = TrackingConfig(enabled=True, uri=args.tracking_uri, timeout_s=args.timeout)
    print(f"replayed {MlflowTracker(config, run_dir).replay()} tracking calls")
    return 0


def _store_args(parser) -> None:
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server")


def add_parser(subparsers) -> None:
    """Add `distill promote` and `distill track replay` to the CLI."""
    p = subparsers.add_parser("promote", help="move a registered model's alias to a version if its gates hold")
    p.add_argument("name", help="registered model name")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", help="model version number")
    which.add_argument("--run", help="the run the version was registered from")
    p.add_argument("--alias", default="champion", help="alias to move (default: champion)")
    p.add_argument("--require", action="append", default=[], metavar="GATE",
                   help="gate that must hold, e.g. 'dev_acc>=0.99*teacher' (repeatable)")
    p.add_argument("--run-dir", help="use the embedded store of this run directory")
    _store_args(p)
    p.set_defaults(func=cmd_promote)

    p = subparsers.add_parser("track", help="tracking maintenance")
    verbs = p.add_subparsers(dest="track_command", required=True)
    r = verbs.add_parser("replay", help="send metrics buffered while the tracking server was down")
    r.add_argument("run_dir")
    _store_args(r)
    r.set_defaults(func=cmd_replay)
