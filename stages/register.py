"""Stage `register`: make a model-producing stage's output a version of a named model, then maybe promote it.

The version points at the MLflow run that logged the model in full (the upstream stage's run when it was
tracked; otherwise this stage logs the model into its own run) and carries the stage's metrics and its
lineage back to the corpus. With `alias` set, the alias moves only when every `require` gate holds; a refusal
is recorded (manifest, version tag, log line) and does not fail the stage, since the version itself is fine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pipeline import log
from pipeline.config import ConfigError
from pipeline.tracking.lineage import lineage_chain
from pipeline.manifest import OutputFile, atomic_write_text
from pipeline.tracking.promote import PromotionRefused, parse_gate

LAUNCH = "single"


@dataclass(kw_only=True)
class Config:
    """Register a model stage's output in the MLflow model registry."""

    model: str = field(default="@task", metadata={"input": True})
    """The model-producing stage output: `@stage`, a path, `runs:/ID` or `models:/NAME@ALIAS`."""
    name: str
    """Registered model name."""
    alias: str | None = None
    """Alias to point at the new version when the gates hold (e.g. champion); None registers only."""
    require: list[str] = field(default_factory=list)
    """Gates that must hold to move the alias, e.g. 'dev_acc>=0.99*teacher' (see `distill promote --help`)."""
    description: str = ""
    """Description stored with the version."""

    def __post_init__(self):
        if not self.name.strip():
            raise ValueError("name must not be empty")
        if self.alias is not None and (not self.alias or self.alias.isdigit() or self.alias == "latest"):
            raise ValueError(f"alias {self.alias!r}: must be a name (not a number, not 'latest')")
        for gate in self.require:
            try:
                parse_gate(gate)
            except ConfigError as err:
                raise ValueError(str(err)) from None


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
