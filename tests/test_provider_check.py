"""The daemon never falls back to CPU silently: degraded state, warning, require_providers."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from agent.hardware.detect import detect
from agent.hardware.providers import PlanInputs, plan_providers
from agent.inference.session import session_options
from tests.broker import MosquittoBroker, Recorder, publisher
from tests.conftest import AgentProcess, base_config
from tests.onnx_builders import build_linear, linear_weights

AgentFactory = Callable[[dict[str, Any]], AgentProcess]
MISSING = "CUDAExecutionProvider"


def pipeline_config() -> dict[str, Any]:
    return {"model": "lin", "input": {"topic": "in/+"}, "output": {"topic": "out/{1}"}}


@pytest.mark.broker
@pytest.mark.skipif(
    MISSING in ort.get_available_providers(), reason="needs an onnxruntime without CUDA"
)
def test_missing_provider_marks_the_model_degraded(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """Asking for CUDA on a CPU-only onnxruntime: READY but degraded, the providers really in
    use published, a warning naming the missing provider, and the model still serves."""
    build_linear(tmp_path / "models" / "lin.onnx")
    config = base_config(
        broker,
        tmp_path,
        models={"lin": {}},
        providers=[MISSING, "CPUExecutionProvider"],
        pipelines={"p": pipeline_config()},
    )
    agent = agent_factory(config)
    warning = agent.wait_for_event("providers_not_loaded")
    assert warning["missing"] == [MISSING]
    assert warning["loaded"] == ["CPUExecutionProvider"]
    assert warning["level"] == "warning"
    states = recorder("edge/dev1/models/lin", "out/#")
    states.wait_for(lambda ms: any(json.loads(m.payload).get("state") == "READY" for m in ms))
    state = json.loads(states.on("edge/dev1/models/lin")[-1].payload)
    assert state["degraded"] is True
    assert state["providers"] == ["CPUExecutionProvider"]
    assert state["requested_providers"] == [MISSING, "CPUExecutionProvider"]
    client = publisher(broker)
    client.publish("in/a", b"[1, 2, 3, 4]", qos=1)
    states.wait_for(lambda ms: any(m.topic == "out/a" for m in ms))
    client.loop_stop()


@pytest.mark.broker
@pytest.mark.skipif(
    MISSING in ort.get_available_providers(), reason="needs an onnxruntime without CUDA"
)
def test_require_providers_refuses_to_serve(
    broker: MosquittoBroker,
    tmp_path: Path,
    agent_factory: AgentFactory,
    recorder: Callable[..., Recorder],
) -> None:
    """With require_providers: true the same model is FAILED and its readings get errors."""
    build_linear(tmp_path / "models" / "lin.onnx")
    config = base_config(
        broker,
        tmp_path,
        models={"lin": {"providers": [MISSING]}},
        require_providers=True,
        pipelines={"p": pipeline_config()},
    )
    agent = agent_factory(config)
    agent.wait_for_event("agent_serving")
    rec = recorder("edge/dev1/models/lin", "edge/dev1/errors", "out/#")
    rec.wait_for(lambda ms: any(m.topic.endswith("/lin") for m in ms))
    state = json.loads(rec.on("edge/dev1/models/lin")[-1].payload)
    assert state["state"] == "FAILED"
    assert "did not load" in state["error"]
    assert "require_providers is true" in state["error"]
    client = publisher(broker)
    client.publish("in/a", b"[1, 2, 3, 4]", qos=1)
    rec.wait_for(lambda ms: any(m.topic == "edge/dev1/errors" for m in ms))
    client.loop_stop()
    assert not rec.on("out/a")
    reason = json.loads(rec.on("edge/dev1/errors")[0].payload)["reason"]
    assert "model 'lin' is not serving (FAILED" in reason


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers()
    or shutil.which("nvidia-smi") is None,
    reason="needs an NVIDIA GPU and onnxruntime-gpu",
)
def test_cuda_is_chosen_verified_and_used_on_a_gpu(tmp_path: Path) -> None:
    """On a GPU machine: the automatic plan puts TensorRT/CUDA first, the session really loads
    CUDA (and TensorRT where its libraries load), and inference matches numpy."""
    hardware = detect()
    assert hardware.nvidia_gpu is not None or hardware.jetson is not None
    model = build_linear(tmp_path / "lin.onnx", features=16, outputs=4)
    plan = plan_providers(
        hardware,
        PlanInputs(
            available=ort.get_available_providers(),
            model_sha256="gpu-test",
            state_dir=tmp_path,
            ort_version=ort.__version__,
        ),
    )
    assert "CUDAExecutionProvider" in plan.names
    session = ort.InferenceSession(
        str(model), sess_options=session_options(plan), providers=plan.for_session()
    )
    loaded = session.get_providers()
    assert "CUDAExecutionProvider" in loaded
    x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    weight, bias = linear_weights(16, 4, 0)
    np.testing.assert_allclose(
        session.run(None, {"x": x})[0], x @ weight + bias, rtol=1e-2, atol=1e-2
    )
    print(f"providers loaded: {loaded}")
