"""SIGHUP: what a new config changes (``plan_reload``, pure) and doing it (``apply_plan``).

The plan is decided from the two configs alone, so it can be tested without a broker; applying
it touches the running parts on the main thread, in the order the plan's fields are listed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import structlog

from agent.config.schema import AgentConfig
from agent.daemon.deadlines import DRAIN_DEADLINE_S, OFFLINE_DEADLINE_S
from agent.daemon.wiring import Parts, build_connections
from agent.transport.retained import RetainedPublisher

log = structlog.get_logger(__name__)


class ModelLoad(NamedTuple):
    """One model to load: ``force`` rebuilds it even when its file's bytes did not change."""

    name: str
    force: bool


@dataclass(frozen=True)
class ReloadPlan:
    """What a reload from one config to another does, in the order it does it.

    Any change also makes the update manager re-read its keys (their files may have changed)
    and, without a reconnect, swap the topics it listens to (the groups may differ); models
    removed from the config are the registry's to drop (``ModelRegistry.reconfigure``).
    """

    changed: bool  # False: the configs are equal and nothing is done
    reconnect: bool = False  # broker or delivery settings changed: new connections, delivery
    state_dir_moved: bool = False  # said, not done: outbox and update state stay until restart
    load_models: tuple[ModelLoad, ...] = ()  # new models, and those whose settings/users changed
    rewatch: bool = False  # the watched files or the watch settings changed
    stop_pipelines: tuple[str, ...] = ()  # removed from the config
    restart_pipelines: tuple[str, ...] = ()  # their settings changed
    start_pipelines: tuple[str, ...] = ()  # added to the config


def plan_reload(old: AgentConfig, new: AgentConfig) -> ReloadPlan:
    """What replacing the running ``old`` config by ``new`` takes; no side effects."""
    changed = new != old
    if not changed:
        return ReloadPlan(changed=False)
    reconnect = (new.mqtt, new.upstream, new.delivery) != (old.mqtt, old.upstream, old.delivery)
    restarted = tuple(
        name
        for name, config in new.pipelines.items()
        if name in old.pipelines and old.pipelines[name] != config
    )
    started = tuple(name for name in new.pipelines if name not in old.pipelines)
    return ReloadPlan(
        changed=True,
        reconnect=reconnect,
        state_dir_moved=new.state_dir != old.state_dir,
        load_models=_model_loads(old, new, restarted + started),
        rewatch=(
            {n: m.file for n, m in new.models.items()} != {n: m.file for n, m in old.models.items()}
            or new.watch != old.watch
            or new.models_dir != old.models_dir
        ),
        stop_pipelines=tuple(name for name in old.pipelines if name not in new.pipelines),
        restart_pipelines=restarted,
        start_pipelines=started,
    )


def _model_loads(
    old: AgentConfig, new: AgentConfig, new_users: tuple[str, ...]
) -> tuple[ModelLoad, ...]:
    """Load new models; rebuild those whose settings or users' pipelines changed."""
    users_changed = {new.pipelines[name].model for name in new_users}
    loads = []
    for name, model in new.models.items():
        if name not in old.models:
            loads.append(ModelLoad(name, force=False))
        elif (
            model != old.models[name]
            or name in users_changed
            or new.providers != old.providers
            or new.models_dir != old.models_dir
        ):
            loads.append(ModelLoad(name, force=True))
    return tuple(loads)


def apply_plan(parts: Parts, plan: ReloadPlan, new: AgentConfig) -> list[str]:
    """Make the running ``parts`` serve ``new`` as ``plan`` says (the main thread); returns
    the models the registry stopped serving. The log level is the caller's to set."""
    old = parts.config
    parts.config = new
    if plan.reconnect:
        _reconnect(parts, new)
    parts.outbox.set_bounds(new.outbox.max_mb, new.outbox.max_age_s)
    parts.delivery.flush_rate = new.outbox.flush_rate
    if plan.state_dir_moved:
        log.warning(
            "restart_needed",
            key="state_dir",
            active=old.state_dir,
            reason="the outbox and update state stay where they are until the agent restarts",
        )
    if not plan.reconnect:  # else _reconnect gave the update manager the new config already
        _reconfigure_updates(parts, new)
    removed_models = parts.registry.reconfigure(new)
    for load in plan.load_models:
        parts.registry.load(load.name, force=load.force)
    if plan.rewatch:
        parts.watcher.stop()
        parts.watcher = parts.make_watcher(new)
        parts.watcher.start()
    _apply_pipelines(parts, plan, new)
    parts.health.update_view(parts.view())
    return removed_models


def _reconfigure_updates(parts: Parts, new: AgentConfig) -> None:
    """The update manager adopts ``new`` (keys, groups) on the same connection: subscribe
    the update topics it gained, unsubscribe those it lost."""
    before = parts.updates.subscriptions()
    parts.updates.reconfigure(new)
    after = {s.subscribe_filter for s in parts.updates.subscriptions()}
    for subscription in before:
        if subscription.subscribe_filter not in after:
            parts.uplink.unsubscribe(subscription.subscribe_filter)
    for subscription in parts.updates.subscriptions():
        if subscription.subscribe_filter not in {s.subscribe_filter for s in before}:
            parts.uplink.subscribe(subscription)


def _apply_pipelines(parts: Parts, plan: ReloadPlan, new: AgentConfig) -> None:
    for name in plan.stop_pipelines:
        pipeline = parts.pipelines.pop(name, None)
        if pipeline is not None:
            parts.connection.unsubscribe(pipeline.subscription().subscribe_filter)
            parts.connection.network_loop.remove_after_read(pipeline.run_inline)
            pipeline.stop(DRAIN_DEADLINE_S)
    for name in plan.restart_pipelines:
        previous = parts.pipelines.pop(name, None)
        if previous is not None:
            parts.connection.network_loop.remove_after_read(previous.run_inline)
        parts.start_pipeline(name, new.pipelines[name])
        if previous is not None:
            old_filter = previous.subscription().subscribe_filter
            if (
                name not in parts.pipelines
                or parts.pipelines[name].subscription().subscribe_filter != old_filter
            ):
                parts.connection.unsubscribe(old_filter)
            previous.stop(DRAIN_DEADLINE_S)
    for name in plan.start_pipelines:
        parts.start_pipeline(name, new.pipelines[name])


def _reconnect(parts: Parts, new: AgentConfig) -> None:
    """Broker or delivery settings changed: say offline, connect anew, subscribe
    everything again."""
    log.info(
        "mqtt_reconnecting",
        host=new.mqtt.host,
        port=new.mqtt.port,
        upstream=f"{new.upstream.host}:{new.upstream.port}" if new.upstream else None,
        delivery=new.delivery,
    )
    parts.retained.stop()
    parts.delivery.stop()
    for connection in parts.connections_in_use():
        connection.stop(timeout_s=OFFLINE_DEADLINE_S)
    parts.connection, parts.uplink = build_connections(new)
    parts.retained = RetainedPublisher(parts.uplink)
    parts.delivery = parts.make_delivery(new)
    parts.errors.set_topic(f"{new.topic_prefix}/errors")
    for pipeline in parts.pipelines.values():
        parts.connection.subscribe(pipeline.subscription())
        parts.connection.network_loop.add_after_read(pipeline.run_inline)
    parts.updates.reconfigure(new)
    for subscription in parts.updates.subscriptions():
        parts.uplink.subscribe(subscription)
    parts.retained.start()
    for connection in parts.connections_in_use():
        connection.start()
    parts.delivery.start()
    for name in parts.registry.names():
        parts.retained.set(
            f"{new.topic_prefix}/models/{name}", parts.registry.status(name).to_json()
        )
