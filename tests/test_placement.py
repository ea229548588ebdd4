"""Node placement from onnxruntime's profile, and require_providers: all_nodes.

Recorded profile events test the reading; onnxruntime's AzureExecutionProvider (offered by
the CPU wheel since 1.16, it loads but takes no node) shows a real partial placement on a
machine without a GPU; a GPU test covers CUDA where there is one.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest

from agent.config.schema import AgentConfig
from agent.errors import ModelLoadError
from agent.hardware.detect import detect
from agent.inference.placement import (
    CPU,
    MAX_NAMED_NODES,
    Placement,
    placement_from_events,
    placement_refusal,
)
from agent.inference.registry import ModelRegistry
from agent.inference.session import LoadedModel, SessionFactory, WarmupLimit
from tests import model_zoo
from tests.onnx_builders import build_two_inputs

AZURE = "AzureExecutionProvider"
CUDA = "CUDAExecutionProvider"
needs_azure = pytest.mark.skipif(
    AZURE not in ort.get_available_providers(),
    reason=f"this onnxruntime ({ort.__version__}) offers no {AZURE} (added in 1.16)",
)


def node(name: str, op: str, provider: str, index: int | None = None) -> dict[str, Any]:
    """One kernel event as onnxruntime's profiler writes it (the fields we read, plus noise)."""
    args: dict[str, Any] = {
        "op_name": op,
        "provider": provider,
        "output_size": "16",
        "thread_scheduling_stats": {"main_thread": {"thread_pool_name": "session-1"}},
    }
    if index is not None:
        args["node_index"] = str(index)
    return {"cat": "Node", "name": f"{name}_kernel_time", "ph": "X", "dur": 5, "args": args}


# A CUDA run as recorded: session events, fences, copies to and from the GPU, one node of an
# op CUDA lacks on the CPU, and the same nodes again for a second warm-up run.
RECORDED: list[Any] = [
    {"cat": "Session", "name": "model_loading_array", "ph": "X", "dur": 100},
    {"cat": "Session", "name": "session_initialization", "ph": "X", "dur": 900},
    {"cat": "Node", "name": "conv1_fence_before", "ph": "X", "args": {"op_name": "Conv"}},
    node("conv1", "Conv", CUDA, 0),
    node("Memcpy_token_1", "MemcpyToHost", CPU, 5),
    node("unique", "Unique", CPU, 1),
    node("Memcpy_token_2", "MemcpyFromHost", CPU, 6),
    node("gemm", "Gemm", CUDA, 2),
    node("conv1", "Conv", CUDA, 0),
    node("unique", "Unique", CPU, 1),
    node("gemm", "Gemm", CUDA, 2),
    {"cat": "Session", "name": "SequentialExecutor::Execute", "ph": "X", "dur": 40},
    "not an event",
    {"cat": "Node", "name": "odd_kernel_time", "args": "no dict"},
]


# -- reading recorded profiles ---------------------------------------------------------------


def test_cpu_only_requests_report_no_fallback() -> None:
    """Every node on the CPU, and only the CPU asked for: nothing fell back."""
    events = [node("a", "Add", CPU, 0), node("b", "Mul", CPU, 1)]
    placement = placement_from_events(events, [CPU])
    assert placement.by_provider == {CPU: 2}
    assert placement.fallback == ()
    assert placement.to_dict() == {"nodes": {CPU: 2}, "fallback_nodes": 0, "fallback": []}


def test_with_a_gpu_provider_requested_cpu_nodes_are_fallback() -> None:
    """CUDA asked for: the Unique node on the CPU is listed; Memcpy nodes, fences, session
    events and the second run's repeats are not counted."""
    placement = placement_from_events(RECORDED, [CUDA, CPU])
    assert placement.by_provider == {CPU: 1, CUDA: 2}
    assert placement.fallback == ("unique (Unique)",)
    assert placement.to_dict() == {
        "nodes": {CPU: 1, CUDA: 2},
        "fallback_nodes": 1,
        "fallback": ["unique (Unique)"],
    }
    assert placement.describe_fallback() == "unique (Unique)"


def test_nodes_sharing_a_name_are_told_apart_by_index() -> None:
    """ONNX does not require unique node names: two CPU nodes called 'n' are two nodes."""
    events = [node("n", "Add", CPU, 3), node("n", "Add", CPU, 4), node("n", "Add", CPU, 3)]
    assert placement_from_events(events, [CUDA, CPU]).fallback == ("n (Add)", "n (Add)")
    unindexed = [node("", "Add", CPU), node("", "Add", CPU)]  # an old profile without index
    assert placement_from_events(unindexed, [CUDA, CPU]).fallback == ("(unnamed) (Add)",)


def test_many_fallback_nodes_are_named_up_to_a_limit() -> None:
    """A status names the first 20 and counts the rest."""
    events = [node(f"n{i}", "Relu", CPU, i) for i in range(MAX_NAMED_NODES + 5)]
    placement = placement_from_events(events, [CUDA, CPU])
    document = placement.to_dict()
    assert document["fallback_nodes"] == MAX_NAMED_NODES + 5
    assert len(document["fallback"]) == MAX_NAMED_NODES
    assert placement.describe_fallback().endswith("n19 (Relu) and 5 more")


# -- the refusal -----------------------------------------------------------------------------


def fell_back() -> Placement:
    return placement_from_events(RECORDED, [CUDA, CPU])


def test_require_providers_false_never_refuses() -> None:
    """false: missing providers and fallen-back nodes are reported elsewhere, not refused."""
    assert placement_refusal(False, [CUDA], [CPU], fell_back(), None) is None
    assert placement_refusal(False, [], [CUDA, CPU], None, "node placement unknown") is None


def test_require_providers_true_refuses_missing_providers_only() -> None:
    """true: a requested provider that did not load is refused; a node on the CPU is not."""
    refusal = placement_refusal(True, [CUDA], [CPU], None, None)
    assert refusal == (
        f"requested providers ['{CUDA}'] did not load (loaded: ['{CPU}']) and "
        "require_providers is true"
    )
    assert placement_refusal(True, [], [CUDA, CPU], fell_back(), None) is None
    assert placement_refusal(True, [], [CUDA, CPU], None, "node placement unknown") is None


def test_require_providers_all_nodes_refuses_fallback_and_unknown_placement() -> None:
    """all_nodes: missing providers, any fallen-back node, or a placement that could not be
    read are refused; a placement all on the requested provider serves."""
    assert "require_providers is all_nodes" in str(
        placement_refusal("all_nodes", [CUDA], [CPU], None, None)
    )
    assert placement_refusal("all_nodes", [], [CUDA, CPU], fell_back(), None) == (
        f"1 node(s) fell back to {CPU}: unique (Unique); require_providers is all_nodes"
    )
    assert placement_refusal("all_nodes", [], [CUDA, CPU], None, "node placement unknown: x") == (
        "node placement unknown: x, and require_providers is all_nodes"
    )
    on_gpu = placement_from_events([node("g", "Gemm", CUDA, 0)], [CUDA, CPU])
    assert placement_refusal("all_nodes", [], [CUDA, CPU], on_gpu, None) is None
    cpu_only = placement_from_events([node("g", "Gemm", CPU, 0)], [CPU])
    assert placement_refusal("all_nodes", [], [CPU], cpu_only, None) is None


# -- real sessions ---------------------------------------------------------------------------


def config_for(
    tmp_path: Path, model: Path, providers: list[str], require: bool | str
) -> AgentConfig:
    return AgentConfig(
        device_id="d",
        models_dir=str(model.parent),
        state_dir=str(tmp_path / "state"),
        models={"m": {"file": model.name}},
        providers=providers,
        require_providers=require,
    )


def build(config: AgentConfig, measure_placement: bool | None = None) -> LoadedModel:
    path = config.model_path("m")
    return SessionFactory(detect()).build(
        config,
        "m",
        path,
        path.read_bytes(),
        "sha256:test",
        started=time.monotonic(),
        limit=WarmupLimit(60, "warmup_timeout_s"),
        measure_placement=measure_placement,
    )


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary folder of this test's own, where the profiles go."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@needs_azure
def test_all_nodes_refuses_a_provider_that_takes_no_node(tmp_path: Path) -> None:
    """[Azure, CPU] loads both providers, but every node runs on the CPU: all_nodes refuses
    and names the nodes."""
    model = build_two_inputs(tmp_path / "models" / "two.onnx")
    with pytest.raises(ModelLoadError) as caught:
        build(config_for(tmp_path, model, [AZURE, CPU], "all_nodes"))
    message = str(caught.value)
    assert message.startswith(f"2 node(s) fell back to {CPU}: ")
    assert "(Add)" in message
    assert "(Mul)" in message
    assert message.endswith("require_providers is all_nodes")


@needs_azure
def test_require_providers_true_serves_and_reports_the_fallback(tmp_path: Path) -> None:
    """The same model with require_providers true serves, not degraded (both providers
    loaded), its placement listing the CPU nodes; through the registry P/models/NAME says
    so, and profiling is off once it serves."""
    model = build_two_inputs(tmp_path / "models" / "two.onnx")
    config = config_for(tmp_path, model, [AZURE, CPU], True)
    published: list[dict[str, Any]] = []
    registry = ModelRegistry(
        config, detect(), lambda _name, payload: published.append(json.loads(payload))
    )
    loaded = registry.load("m")
    assert loaded is not None
    assert loaded.providers == (AZURE, CPU)
    assert not loaded.degraded
    assert loaded.placement is not None
    assert loaded.placement.by_provider == {CPU: 2}
    assert sorted(loaded.placement.fallback) == ["Add_0 (Add)", "Mul_1 (Mul)"]
    state = published[-1]
    assert state["state"] == "READY"
    assert state["placement"]["nodes"] == {CPU: 2}
    assert state["placement"]["fallback_nodes"] == 2
    assert state["validation"] is None  # no golden set beside it
    assert loaded.session.end_profiling() == ""


def test_cpu_only_placement_and_profiling_cleaned_up(tmp_path: Path, private_tmp: Path) -> None:
    """A CPU model: placement is not measured by default (nothing can fall back, and a
    profiled warm-up costs time and memory) and all_nodes serves; measured on request
    (`model check`), every node is counted on the CPU; the profile's folder is gone after
    the load and profiling is off."""
    model = model_zoo.build_cnn1d(tmp_path / "models" / "cnn.onnx", channels=8)
    unmeasured = build(config_for(tmp_path, model, [CPU], "all_nodes"))
    assert unmeasured.placement is None
    assert "not measured" in (unmeasured.placement_problem or "")
    loaded = build(config_for(tmp_path, model, [CPU], "all_nodes"), measure_placement=True)
    assert loaded.placement is not None
    assert loaded.placement_problem is None
    assert set(loaded.placement.by_provider) == {CPU}
    assert loaded.placement.by_provider[CPU] >= 4  # convolutions fused, pooling, gemm...
    assert loaded.placement.fallback == ()
    assert list(private_tmp.iterdir()) == []
    assert loaded.session.end_profiling() == ""


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_failed_loads_leave_no_profile_behind(tmp_path: Path, private_tmp: Path) -> None:
    """A file that is no model (the session constructor fails) and a model the pipelines
    refuse: no edge-agent-placement-* folder is left in the temp dir."""
    junk = tmp_path / "models" / "junk.onnx"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="not an ONNX model"):
        build(config_for(tmp_path, junk, [CPU], False))
    assert list(private_tmp.iterdir()) == []
    model = build_two_inputs(tmp_path / "models" / "two.onnx")
    refusing = config_for(tmp_path, model, [CPU], False).model_copy(
        update={"require_providers": "all_nodes", "providers": (CUDA, CPU)}
    )
    if CUDA not in ort.get_available_providers():
        with pytest.raises(ModelLoadError, match="did not load"):
            build(refusing)
        assert list(private_tmp.iterdir()) == []


@pytest.mark.skipif(
    CUDA not in ort.get_available_providers(),
    reason="needs onnxruntime-gpu with CUDAExecutionProvider (an NVIDIA GPU)",
)
def test_all_nodes_refuses_a_model_with_an_op_cuda_lacks_on_a_gpu(tmp_path: Path) -> None:
    """The IsolationForest's TreeEnsembleRegressor (ai.onnx.ml) has no CUDA kernel: with
    [CUDA, CPU] it runs partly on the CPU, which all_nodes refuses and true serves."""
    model = model_zoo.build_iforest(tmp_path / "models" / "iforest.onnx", trees=5)
    with pytest.raises(ModelLoadError) as caught:
        build(config_for(tmp_path, model, [CUDA, CPU], "all_nodes"))
    assert "(TreeEnsembleRegressor)" in str(caught.value)
    served = build(config_for(tmp_path, model, [CUDA, CPU], True))
    assert served.placement is not None
    assert any("TreeEnsembleRegressor" in node for node in served.placement.fallback)
