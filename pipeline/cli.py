"""`distill`: run recipes, stages and sweeps, inspect and verify run directories.

Errors a person can fix (bad config, missing file, mismatched input) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline import __version__, log, registry
from pipeline.config import ConfigError
from pipeline.manifest import DiskFull, ManifestError, disk_full
from pipeline.train.preempt import EXIT_PREEMPTED, Preempted
from pipeline.world import world_from_env

USER_ERRORS = (ConfigError, ManifestError, FileNotFoundError, DiskFull)
"""Exceptions whose message is the whole story: printed as one line, no traceback."""


def _run_dir(recipe, given: str | None) -> Path:
    return Path(given or recipe.run.run_dir or Path("runs") / recipe.run.name)


def _worker_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", help="where stage outputs go (default: run.run_dir or runs/<run.name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set stages.general.lr=3e-4 (repeatable)")
    parser.add_argument("--force", action="store_true", help="redo stages even if their manifest matches")
    parser.add_argument("--worker", type=int, help="this worker's index for shard-parallel stages")
    parser.add_argument("--num-workers", type=int, help="number of workers splitting shard-parallel stages")


def _configure_log(world) -> None:
    # Training ranks other than 0 stay quiet; array workers tag their lines.
    if world.world_size > 1:
        log.configure(quiet=world.rank != 0)
    elif world.num_workers > 1:
        log.configure(prefix=f"[worker {world.worker}] ")


def cmd_run(args) -> int:
    from pipeline.recipe import load_recipe
    from pipeline.runner import run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    world = world_from_env(args.worker, args.num_workers)
    _configure_log(world)
    stages = [s for s in (args.stages or "").split(",") if s]
    args.writing_to = _run_dir(recipe, args.run_dir)  # named by a full-disk error that names no file
    run_recipe(recipe, args.writing_to, stages=stages, world=world, force=args.force)
    return 0


def cmd_stage(args) -> int:
    from pipeline.recipe import load_stage_file
    from pipeline.runner import run_recipe

    recipe = load_stage_file(args.name, args.config, args.overrides)
    world = world_from_env(args.worker, args.num_workers)
    _configure_log(world)
    args.writing_to = _run_dir(recipe, args.run_dir)
    run_recipe(recipe, args.writing_to, stages=[args.name], world=world, force=args.force)
    return 0


def cmd_sweep(args) -> int:
    from pipeline.sweep import run_sweep

    stages = [s for s in (args.stages or "").split(",") if s] or None
    args.writing_to = args.run_dir
    result = run_sweep(args.recipe, args.vary, overrides=args.overrides, sweep_dir=args.run_dir, stages=stages,
                       score_stage=args.score_stage, keep_going=args.keep_going, dry_run=args.dry_run)
    if args.dry_run:
        print(result["plan"])
        return 0
    done = len(result["variants"]) - len(result["failed"])
    print(f"sweep: {done} of {len(result['variants'])} variants compared on {result['split']}: see "
          f"{Path(result['sweep_dir']) / 'sweep.md'}")
    return 1 if result["failed"] else 0


def cmd_status(args) -> int:
    from pipeline.inspect import format_status, stage_rows, sweep_variants

    variants = sweep_variants(Path(args.run_dir))
    if variants is not None:  # a sweep: one table per variant
        tables = {v.name: stage_rows(v) for v in variants}
        print(json.dumps(tables, indent=2) if args.json else
              "\n\n".join(f"{name}:\n{format_status(rows)}" for name, rows in tables.items()))
        return 0
    rows = stage_rows(Path(args.run_dir))
    job_columns = registry.load_symbol(registry.STATUS_COLUMNS)  # cluster job ids and states, when submitted
    extra = job_columns(Path(args.run_dir)) if job_columns is not None else {}
    print(json.dumps(rows, indent=2) if args.json else format_status(rows, extra))
    return 0


def cmd_verify(args) -> int:
    from pipeline.inspect import verify_path

    for line in verify_path(Path(args.path)):
        print(line)
    return 0


def cmd_config(args) -> int:
    import yaml

    from pipeline.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    print(yaml.safe_dump(recipe.resolved(), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `distill` argument parser; other modules add their verbs through `COMMANDS`."""
    parser = argparse.ArgumentParser(prog="distill", description="Knowledge distillation for BERT-style models.")
    parser.add_argument("--version", action="version", version=f"distill {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a recipe's stages in order")
    p.add_argument("recipe")
    p.add_argument("--stages", help="comma-separated subset of the recipe's stages")
    _worker_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("stage", help="run one stage (CONFIG is a recipe or that stage's own config)")
    p.add_argument("name")
    p.add_argument("config")
    _worker_args(p)
    p.set_defaults(func=cmd_stage)

    p = sub.add_parser("sweep", help="run a recipe's variants, sharing unchanged stages, and compare them")
    p.add_argument("recipe")
    p.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                   help="a recipe key and its values, e.g. --vary stages.task.objective=tinybert,pkd (repeatable: "
                        "the variants are the product)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a config value for every variant (repeatable)")
    p.add_argument("--run-dir", help="the sweep directory (default: run.run_dir or runs/<run.name>-sweep)")
    p.add_argument("--stages", help="comma-separated subset of the recipe's stages to run in each variant")
    p.add_argument("--score-stage", help="stage whose manifest metrics score a variant (default: the last one "
                                         "reporting student_test_score or student_dev_score)")
    p.add_argument("--keep-going", action="store_true", help="when a variant fails, note it in the table and run "
                                                              "the next (a rerun retries it)")
    p.add_argument("--dry-run", action="store_true", help="print the variants and stage runs; run nothing")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("status", help="table of a run's stages: done / partial / missing")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("verify", help="re-hash everything a manifest lists")
    p.add_argument("path", help="a stage directory, its manifest.json, or a run directory")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("config", help="print the resolved config of a recipe")
    p.add_argument("recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_config)

    for add in COMMANDS:
        add(sub)
    return parser


def _extra_commands() -> list:
    """Verbs that live with their subsystem (submit in launch/, promote in tracking, bench in bench/)."""
    found = (registry.load_symbol(f"{module}:add_parser") for module in registry.COMMANDS)
    return [add for add in found if add is not None]


COMMANDS: list = []

_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\x00"}


def one_line(message: object) -> str:
    """The message with line breaks (every one `str.splitlines` knows) and NUL escaped: an error stays one
    line even when it quotes a key or a value holding them."""
    from pipeline.secrets import scrub

    return scrub(str(message)).translate(_BREAKS)


def _rank_lost(err: Exception):
    if not isinstance(err, RuntimeError) or "torch.distributed" not in sys.modules:  # no process group without it; keep torch out of plain CLI calls
        return None
    from pipeline.train.dist import lost_ranks

    return lost_ranks(err)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `distill` console script."""
    COMMANDS[:] = _extra_commands()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"distill: error: {one_line(err)}", file=sys.stderr)
        return 2
    except Preempted as err:
        print(f"distill: preempted: {err} (checkpoint saved; rerun the same command to resume)", file=sys.stderr)
        return EXIT_PREEMPTED
    except Exception as err:  # a full disk or a lost rank is one line; anything else is a bug: its traceback
        known = disk_full(err, getattr(args, "writing_to", None)) or _rank_lost(err)
        if known is None:
            raise
        print(f"distill: error: {one_line(known)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distill: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
