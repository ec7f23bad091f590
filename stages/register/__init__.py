"""Stage `register`: make a model-producing stage's output a version of a named model, then maybe promote it.

The version points at the MLflow run that logged the model in full (the upstream stage's run when it was
tracked; otherwise this stage logs the model into its own run) and carries the stage's metrics and its
lineage back to the corpus. With `alias` set, the alias moves only when every `require` gate holds; a refusal
is recorded (manifest, version tag, log line) and does not fail the stage, since the version itself is fine.
"""

from __future__ import annotations

import json
import os
import signal

from pipeline import log
from pipeline.config import ConfigError
from pipeline.manifest import OutputFile, atomic_write_text
from pipeline.tracking.lineage import lineage_chain
from pipeline.tracking.promote import PromotionRefused

LAUNCH = "single"


from stages.register.config import Config


def run(config: Config, ctx):
    try:
        registry = ctx.tracker.model_registry()
    except ConfigError as err:
        raise ConfigError(f"stages.{ctx.name}: {err}") from None
    upstream = ctx.input_manifest("model")
    model_dir = upstream.extra.get("model_dir")
    if not model_dir or not (ctx.input_dir("model") / model_dir).is_dir():
        raise ConfigError(f"stages.{ctx.name}.model: {config.model!r} ({upstream.stage}) did not save a model "
                          "(no extra.model_dir in its manifest); point it at teacher_adapt, general, "
                          "teacher_finetune or task")
    run_id = registry.source_run(ctx.input_dir("model"), model_dir)
    chain = lineage_chain(ctx.input_dir("model"))
    tags = {
        "distill.metrics": json.dumps(upstream.metrics, sort_keys=True),
        "distill.manifest_sha256": ctx.inputs["model"].sha256,
        "distill.stage": upstream.stage,
        "distill.lineage": " <- ".join(f"{c['name']}({c['stage']})" for c in chain)[:5000],
        "distill.lineage_runs": json.dumps([c["run_id"] for c in chain])[:5000],
    }
    version = registry.create_version(config.name, run_id, tags, config.description or None)
    if config.die_after_version:
        os.kill(os.getpid(), signal.SIGKILL)
    log.info(f"{ctx.name}: registered {config.name} version {version.version} from run {run_id}")
    record = {"name": config.name, "version": str(version.version), "run_id": run_id, "alias": config.alias,
              "promoted": False, "reason": "no alias requested", "lineage": chain}
    if config.alias:
        try:
            record["reason"] = registry.promote(config.name, version, config.alias, config.require)
            record["promoted"] = True
            log.info(f"{ctx.name}: {record['reason']}")
        except PromotionRefused as err:
            record["reason"] = str(err)
            log.warn(f"{ctx.name}: {err}")
    ctx.tracker.set_tags({"distill.registered": f"{config.name}/{version.version}",
                          "distill.promotion": record["reason"][:5000]})
    atomic_write_text(ctx.stage_dir / "registered.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
    metrics = {"version": int(version.version), "promoted": int(record["promoted"])}
    extra = {k: record[k] for k in ("name", "version", "run_id", "alias", "promoted", "reason")}
    return ctx.manifest(config, [OutputFile.of(ctx.stage_dir, "registered.json")], metrics=metrics, extra=extra)
