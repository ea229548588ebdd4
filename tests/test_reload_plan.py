"""What a SIGHUP reload does, decided from the two configs alone (no broker, no process), and
a daemon that can be built without touching the disk."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, NoReturn

import pytest

from agent.config.schema import AgentConfig
from agent.daemon import lifecycle
from agent.daemon.reload import ModelLoad, ReloadPlan, plan_reload

BASE: dict[str, Any] = {
    "device_id": "box1",
    "models_dir": "/models",
    "state_dir": "/state",
    "models": {"m": {"file": "m.onnx"}, "n": {"file": "n.onnx"}},
    "pipelines": {
        "p": {"model": "m", "input": {"topic": "in/p"}, "output": {"topic": "out/p"}},
        "q": {"model": "n", "input": {"topic": "in/q"}, "output": {"topic": "out/q"}},
    },
}

NOTHING = ReloadPlan(changed=False)
# Any change re-reads the update keys and, without a reconnect, swaps the update topics.
CHANGED = ReloadPlan(changed=True)


def config(**changes: Any) -> AgentConfig:
    """BASE with top-level keys replaced (None removes one)."""
    raw = copy.deepcopy(BASE)
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    return AgentConfig.model_validate(raw)


def pipelines(**changes: Any) -> dict[str, Any]:
    """BASE's pipelines with some replaced (None removes one)."""
    result: dict[str, Any] = copy.deepcopy(BASE["pipelines"])
    for name, body in changes.items():
        if body is None:
            del result[name]
        else:
            result[name] = body
    return result


def replaced(plan: ReloadPlan, **fields: Any) -> ReloadPlan:
    """``plan`` with some fields changed."""
    return dataclasses.replace(plan, **fields)


def test_an_unchanged_config_does_nothing() -> None:
    """An equal config (read again from the same file) plans nothing at all."""
    assert plan_reload(config(), config()) == NOTHING


def test_a_changed_log_level_changes_nothing_else() -> None:
    """A setting no part holds: only the update manager's keys are read again."""
    assert plan_reload(config(), config(log_level="debug")) == CHANGED


def test_a_changed_mqtt_section_reconnects() -> None:
    """New broker settings: new connections, which subscribe the update topics themselves;
    the models and pipelines are left alone."""
    plan = plan_reload(config(), config(mqtt={"port": 1884}))
    assert plan == replaced(CHANGED, reconnect=True)


@pytest.mark.parametrize(
    "changes",
    [
        {"delivery": "at_most_once"},
        {"upstream": {"host": "upstream.example"}},
    ],
)
def test_changed_delivery_or_upstream_reconnects(changes: dict[str, Any]) -> None:
    """The delivery mode and the upstream broker shape the connections too."""
    plan = plan_reload(config(), config(**changes))
    assert plan.reconnect


def test_a_changed_pipeline_is_restarted_and_its_model_rebuilt() -> None:
    """A pipeline's settings shape its model's session (batch size): both are rebuilt."""
    body = copy.deepcopy(BASE["pipelines"]["q"])
    body["batching"] = {"max_batch": 4}
    plan = plan_reload(config(), config(pipelines=pipelines(q=body)))
    assert plan == replaced(
        CHANGED, restart_pipelines=("q",), load_models=(ModelLoad("n", force=True),)
    )


def test_an_added_and_a_removed_pipeline() -> None:
    """The removed one stops, the added one starts and its model is rebuilt for it."""
    added = {"model": "m", "input": {"topic": "in/r"}, "output": {"topic": "out/r"}}
    plan = plan_reload(config(), config(pipelines=pipelines(q=None, r=added)))
    assert plan == replaced(
        CHANGED,
        stop_pipelines=("q",),
        start_pipelines=("r",),
        load_models=(ModelLoad("m", force=True),),
    )


def test_a_changed_model_path_reloads_and_rewatches() -> None:
    """Another file for a model: it is rebuilt, and the watcher watches the new file."""
    plan = plan_reload(config(), config(models={"m": {"file": "m2.onnx"}, "n": {"file": "n.onnx"}}))
    assert plan == replaced(CHANGED, load_models=(ModelLoad("m", force=True),), rewatch=True)


def test_a_changed_models_dir_rebuilds_every_model() -> None:
    """Every model's path moved: all are rebuilt and watched anew."""
    plan = plan_reload(config(), config(models_dir="/elsewhere"))
    assert plan.load_models == (ModelLoad("m", force=True), ModelLoad("n", force=True))
    assert plan.rewatch


def test_an_added_and_a_removed_model() -> None:
    """A new model is loaded (not forced: nothing serves it yet); a removed one is not
    loaded (the registry drops it); both change what is watched."""
    plan = plan_reload(
        config(), config(models={"m": {"file": "m.onnx"}}, pipelines=pipelines(q=None))
    )
    assert plan == replaced(CHANGED, rewatch=True, stop_pipelines=("q",))
    plan = plan_reload(config(), config(models={**BASE["models"], "o": {"file": "o.onnx"}}))
    assert plan == replaced(CHANGED, load_models=(ModelLoad("o", force=False),), rewatch=True)


def test_a_changed_watch_setting_rewatches_only() -> None:
    """The watcher is rebuilt; no model is loaded again."""
    plan = plan_reload(config(), config(watch={"mode": "polling"}))
    assert plan == replaced(CHANGED, rewatch=True)


def test_changed_providers_rebuild_every_model() -> None:
    """The execution providers shape every session."""
    plan = plan_reload(config(), config(providers=["CPUExecutionProvider"]))
    assert plan == replaced(
        CHANGED, load_models=(ModelLoad("m", force=True), ModelLoad("n", force=True))
    )


def test_changed_update_keys_reconfigure_updates_only() -> None:
    """New trusted keys: the update manager reads them; connections, models and pipelines
    stay."""
    plan = plan_reload(config(), config(updates={"trusted_keys": ["/keys/a.pub"]}))
    assert plan == CHANGED


def test_a_moved_state_dir_is_only_said() -> None:
    """The outbox and update state stay until a restart: the plan says so, nothing more."""
    plan = plan_reload(config(), config(state_dir="/other"))
    assert plan == replaced(CHANGED, state_dir_moved=True)


def test_a_daemon_is_built_without_side_effects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Constructing a Daemon builds no part (no hardware scan, lock, outbox or keys) and
    creates nothing: its state and models folders still do not exist."""

    def no_parts(config: AgentConfig) -> NoReturn:
        pytest.fail("Daemon() built its parts; only run() may")

    monkeypatch.setattr(lifecycle, "Parts", no_parts)
    state, models = tmp_path / "absent" / "state", tmp_path / "absent" / "models"
    given = config(state_dir=str(state), models_dir=str(models))
    daemon = lifecycle.Daemon(given, None, log_level_override="debug")
    assert daemon.config is given
    assert daemon.source is None
    assert list(tmp_path.iterdir()) == []
