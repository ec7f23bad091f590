"""Stage `register`: make a model-producing stage's output a version of a named model, then maybe promote it.

The version's source is the MLflow Model in the run that logged the model in full (`runs:/RUN/model`: the
upstream stage's run when it was tracked; otherwise this stage logs the model into its own run), so MLflow
loads and serves `models:/NAME@ALIAS` itself. It carries the stage's metrics, its lineage back to the corpus,
and this stage's run id (tag `distill.registered_by`): a rerun after a kill finds that version instead of
creating a second one. With `alias` set, the alias moves only when every `require` gate holds; a refusal is
recorded (manifest, version tag, log line) and does not fail the stage, since the version itself is fine.
"""

from __future__ import annotations

import json
import os
import signal

from pipeline import log
from pipeline.config import ConfigError
from pipeline.manifest import OutputFile, atomic_write_text
from pipeline.tracking.lineage import lineage_chain
from pipeline.tracking.models import version_tags
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
    chain = lineage_chain(ctx.input_dir("model"))
    tags = version_tags(ctx.input_dir("model"))
    # The stage directory and the manifest of the model it registers: the same on any rerun after a kill, even
    # one whose tracking run could not be reopened, so a rerun finds the version it made.
    key = f"stage:{ctx.stage_dir.resolve()}:{ctx.inputs['model'].sha256}"
    version, created = registry.register(config.name, ctx.input_dir("model"), model_dir, key, tags,
                                         config.description or None)
    run_id = version.run_id
    if created:
        log.info(f"{ctx.name}: registered {config.name} version {version.version} from run {run_id}")
    else:
        log.info(f"{ctx.name}: {config.name} version {version.version} was registered by an earlier attempt")
    if config.die_after_version:
        os.kill(os.getpid(), signal.SIGKILL)
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
