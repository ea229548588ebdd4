"""What ``P/models/NAME`` says about each configured model: its state, version, providers
and the steps of its latest load. Owned by the model registry."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.config.schema import AgentConfig
from agent.errors import GoldenMismatchError, ModelLoadError, ShadowRefusedError
from agent.inference.codecs import encode_json
from agent.inference.session import LoadedModel
from agent.strenum import StrEnum

StatePublisher = Callable[[str, bytes], None]


class ModelState(StrEnum):
    """Lifecycle states published on ``P/models/NAME``."""

    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"


@dataclass
class ModelStatus:
    """What is published about a model; owned by the registry's status board, changed under
    its lock."""

    name: str
    file: str
    state: ModelState = ModelState.LOADING
    version: str | None = None
    providers: tuple[str, ...] = ()
    requested: tuple[str, ...] = ()
    degraded: bool = False
    loaded_at: float | None = None
    error: str | None = None
    last_load: dict[str, Any] | None = None
    placement: dict[str, Any] | None = None
    validation: dict[str, Any] | None = None

    def to_json(self) -> bytes:
        """The retained ``P/models/NAME`` payload."""
        return encode_json(
            {
                "name": self.name,
                "state": self.state.value,
                "version": self.version,
                "file": self.file,
                "providers": list(self.providers),
                "requested_providers": list(self.requested),
                "degraded": self.degraded,
                "loaded_at": self.loaded_at,
                "error": self.error,
                "last_load": self.last_load,
                "placement": self.placement,
                "validation": self.validation,
            }
        )


class StatusBoard:
    """The published status of every configured model and the steps of its loads: what
    ``P/models/NAME`` says. Any thread; publishes outside its lock."""

    def __init__(self, config: AgentConfig, publish_state: StatePublisher) -> None:
        self._publish_state = publish_state
        self._lock = threading.Lock()  # guards _status
        self._status: dict[str, ModelStatus] = {
            name: ModelStatus(name=name, file=str(config.model_path(name)))
            for name in config.models
        }

    def names(self) -> list[str]:
        """Names of the models with a status."""
        with self._lock:
            return list(self._status)

    def get(self, name: str) -> ModelStatus:
        """The status of ``name`` (KeyError when it has none)."""
        with self._lock:
            return self._status[name]

    def has(self, name: str) -> bool:
        """Whether ``name`` still has a status (a config reload may have removed it)."""
        with self._lock:
            return name in self._status

    def adopt(self, config: AgentConfig) -> list[str]:
        """Drop the statuses of models ``config`` lacks and add its new ones; returns the
        dropped names (``unpublish`` them once outside any lock)."""
        with self._lock:
            removed = [name for name in self._status if name not in config.models]
            for name in removed:
                del self._status[name]
            for name in config.models:
                if name not in self._status:
                    self._status[name] = ModelStatus(name=name, file=str(config.model_path(name)))
                else:
                    self._status[name].file = str(config.model_path(name))
        return removed

    def unpublish(self, name: str) -> None:
        """Clear the retained state of a removed model."""
        self._publish_state(name, b"")  # an empty retained message deletes it

    def loading(self, name: str, version: str, serving: bool) -> dict[str, Any]:
        """Publish that ``version`` of ``name`` is loading; returns the attempt's record."""
        now = time.time()
        attempt = {"state": ModelState.LOADING.value, "version": version, "started": now, "ts": now}
        self.update(
            name, last_load=attempt, state=ModelState.READY if serving else ModelState.LOADING
        )
        return attempt

    def ready(self, name: str, model: LoadedModel, attempt: dict[str, Any]) -> None:
        """Publish that ``model`` serves, the load ``attempt`` having succeeded."""
        self.update(
            name,
            state=ModelState.READY,
            version=model.version,
            providers=model.providers,
            requested=model.requested,
            degraded=model.degraded,
            loaded_at=model.loaded_at,
            error=None,
            placement=model.placement.to_dict() if model.placement else None,
            validation=model.validation.to_dict() if model.validation else None,
            last_load={**attempt, "state": ModelState.READY.value, "ts": time.time()},
        )

    def failed(
        self,
        name: str,
        version: str | None,
        exc: ModelLoadError,
        serving: bool,
        started: float | None,
    ) -> None:
        """Publish that a load of ``name`` failed (still READY while an older one serves);
        a failed golden set check names step ``validating`` and carries its figures."""
        record: dict[str, Any] = {
            "state": ModelState.FAILED.value,
            "version": version,
            "error": str(exc),
            "step": _failed_step(exc),
            "started": started or time.time(),
            "ts": time.time(),
        }
        report = getattr(exc, "report", None)
        if report is not None:
            record["validation"] = report.to_dict()
        if isinstance(exc, ShadowRefusedError):
            record["shadow"] = exc.figures
        self.update(
            name,
            state=ModelState.READY if serving else ModelState.FAILED,
            error=str(exc),
            last_load=record,
        )

    def update(self, name: str, **changes: Any) -> None:
        """Change fields of ``name``'s status and publish it."""
        with self._lock:
            status = self._status.get(name)
            if status is None:
                return  # removed by a config reload while it loaded
            for key, value in changes.items():
                setattr(status, key, value)
            payload = status.to_json()
        self._publish_state(name, payload)


def _failed_step(exc: ModelLoadError) -> str:
    """The step a failed load names: where the model was refused."""
    if isinstance(exc, GoldenMismatchError):
        return "validating"
    if isinstance(exc, ShadowRefusedError):
        return "shadow"
    return "loading"
