"""docs/grafana-dashboard.json against the Prometheus endpoint of a running daemon."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.broker import MosquittoBroker, Recorder, free_port, publisher
from tests.conftest import AgentProcess, base_config
from tests.onnx_builders import build_linear

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GOOD_READINGS = 5
BAD_READINGS = 1
# Families the endpoint declares on every host but fills only where the hardware has them.
MAY_BE_EMPTY = {"edge_agent_temperature_celsius"}
SCRAPE_TIMEOUT_S = 15.0

# PromQL pieces that hold no metric names, removed before looking for identifiers.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.])[A-Za-z_:][\w:]*")
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "and",
    "or",
    "unless",
    "inf",
    "nan",
    "atan2",
}
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*\w+\s*\)\s*$", re.DOTALL)
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers that are not functions,
    aggregations, keywords, label names, durations or Grafana variables."""
    text = _STRING.sub(" ", expr)
    text = _GRAFANA_VARIABLE.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        after = text[match.end() :].lstrip()
        if after.startswith("(") or match.group() in _KEYWORDS:
            continue  # a function or aggregation call, or an operator word
        names.add(match.group())
    return names


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, also those inside collapsed rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """PromQL of every panel target and of every query variable (its selector)."""
    queries = [
        target["expr"]
        for panel in iter_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        query = query["query"] if isinstance(query, dict) else query
        label_values = _LABEL_VALUES.match(query)
        # label_values(SELECTOR, LABEL): only the selector is PromQL.
        queries.append(label_values.group(1) if label_values else query)
    return queries


def exposed_types(text: str) -> dict[str, str]:
    """Metric family name -> type, from the ``# TYPE`` lines of an exposition."""
    types = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            types[name] = kind
    return types


def sample_names(text: str) -> set[str]:
    """The names of the samples in an exposition."""
    return {
        re.split(r"[{ ]", line, maxsplit=1)[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def served_family(name: str, types: dict[str, str]) -> str | None:
    """The exposed family a queried name belongs to, or None when the endpoint has none.

    A classic histogram is queried through its _bucket/_sum/_count series, never by its
    own name; a counter or gauge by exactly its name (a counter's includes _total)."""
    for suffix in _HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and (
            types.get(base) == "histogram" or (suffix != "_bucket" and types.get(base) == "summary")
        ):
            return base
    if types.get(name) in {"counter", "gauge", "untyped"}:
        return name
    return None


def load_dashboard() -> dict[str, Any]:
    """The dashboard JSON."""
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def scrape(port: int) -> str:
    """The text of the daemon's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text: str = response.read().decode()
    return text


def _counted(text: str) -> bool:
    """Whether the scrape counts every reading the fixture sent."""
    return (
        f'edge_agent_latency_seconds_count{{pipeline="p"}} {GOOD_READINGS}.0' in text
        and f'edge_agent_readings_rejected_total{{pipeline="p"}} {BAD_READINGS}.0' in text
    )


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> str:
    """/metrics of a real daemon (real Mosquitto, real ONNX model) that answered
    ``GOOD_READINGS`` readings and rejected ``BAD_READINGS``; everything is stopped before
    the tests read it (one daemon for the module: it is the slow part)."""
    tmp_path = tmp_path_factory.mktemp("dashboard")
    (tmp_path / "broker").mkdir()
    broker = MosquittoBroker(tmp_path / "broker")
    broker.start()
    agent: AgentProcess | None = None
    try:
        build_linear(tmp_path / "models" / "lin.onnx")
        port = free_port()
        config = base_config(
            broker,
            tmp_path,
            models={"lin": {}},
            metrics={"listen": f"127.0.0.1:{port}"},
            pipelines={
                "p": {"model": "lin", "input": {"topic": "in/+"}, "output": {"topic": "out/{1}"}}
            },
        )
        config_file = tmp_path / "agent.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        agent = AgentProcess(config_file, tmp_path / "agent.log")
        agent.wait_for_event("agent_serving")
        results = Recorder(broker, ["out/#"]).start()
        client = publisher(broker)
        try:
            for index in range(GOOD_READINGS):
                client.publish(f"in/{index}", b"[1, 2, 3, 4]", qos=1)
            for _ in range(BAD_READINGS):
                client.publish("in/bad", b"[1, 2", qos=1)
            results.wait_for(lambda ms: len(ms) >= GOOD_READINGS)
        finally:
            client.disconnect()
            client.loop_stop()
            results.stop()
        # A result is on the broker a moment before the worker counts it: wait for the count.
        deadline = time.monotonic() + SCRAPE_TIMEOUT_S
        text = scrape(port)
        while not _counted(text) and time.monotonic() < deadline:
            time.sleep(0.05)
            text = scrape(port)
        assert _counted(text), text
        return text
    finally:
        if agent is not None:
            agent.terminate()
            agent.close()
        broker.stop()


def test_promql_names_skip_functions_labels_and_variables() -> None:
    """The PromQL scan finds the metrics of an expression and nothing else."""
    expr = (
        "histogram_quantile(0.95, sum by (instance, le) (rate(a_seconds_bucket"
        '{instance=~"$instance", x="b_c{}"}[$__rate_interval]))) + on (job) group_left '
        "(device_id) max without (zone) (b_info offset 5m) * 1e3 > bool ${threshold}"
    )
    assert promql_metric_names(expr) == {"a_seconds_bucket", "b_info"}
    assert promql_metric_names("sum(rate(c_total[5m])) by (pipeline) or vector(0)") == {"c_total"}


def test_dashboard_is_valid_grafana_json() -> None:
    """The dashboard parses, imports with any Prometheus data source (a datasource
    variable), and every panel queries it with non-empty expressions without overlapping
    another panel."""
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] == "edge-agent"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"device", "instance", "pipeline"} <= set(variables)
    panels = list(iter_panels(dashboard["panels"]))
    assert len({panel["id"] for panel in panels}) == len(panels)
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        if panel["type"] == "row":
            continue
        title = panel["title"]
        assert panel["datasource"] == DATASOURCE, title
        assert panel["targets"], title
        for target in panel["targets"]:
            assert target["expr"].strip(), title
            assert target["datasource"] == DATASOURCE, title
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, title
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{title} overlaps {cells.get((x, y))}"
                cells[(x, y)] = title
    titles = {panel["title"] for panel in panels}
    assert {
        "Throughput",
        "Latency percentiles",
        "Queue depth",
        "Drops",
        "Errors",
        "Model state",
        "Outbox backlog",
        "CPU",
        "Resident memory",
        "Temperature",
    } <= titles


@pytest.mark.broker
def test_every_queried_metric_is_served(scraped: str) -> None:
    """Every metric the dashboard's panels and variables query is on the endpoint of a
    running daemon, with samples (but for hardware the test machine may lack)."""
    types = exposed_types(scraped)
    samples = sample_names(scraped)
    queried = set().union(*(promql_metric_names(q) for q in dashboard_queries(load_dashboard())))
    assert "edge_agent_latency_seconds_bucket" in queried
    missing = sorted(name for name in queried if served_family(name, types) is None)
    assert not missing, f"queried but not served: {missing}; served: {sorted(types)}"
    empty = sorted(
        name
        for name in queried
        if name not in samples and served_family(name, types) not in MAY_BE_EMPTY
    )
    assert not empty, f"served without samples: {empty}"


@pytest.mark.broker
def test_endpoint_passes_promtool(scraped: str, tmp_path: Path) -> None:
    """``promtool check metrics`` finds nothing to complain about in the endpoint, and
    ``promtool check rules`` parses every dashboard query (variables filled in)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not on PATH (Debian: apt-get install prometheus)")
    check = subprocess.run(
        [promtool, "check", "metrics"], input=scraped, text=True, capture_output=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert not (check.stdout + check.stderr).strip(), check.stdout + check.stderr
    # Grafana fills in $__rate_interval and the variables before Prometheus parses a query.
    rules = [
        {
            "record": f"dashboard:query_{index}",
            "expr": _GRAFANA_VARIABLE.sub(
                lambda m: "5m" if "rate_interval" in m.group() else ".*", query
            ),
        }
        for index, query in enumerate(dashboard_queries(load_dashboard()))
    ]
    rules_file = tmp_path / "dashboard.rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    parse = subprocess.run(
        [promtool, "check", "rules", str(rules_file)], text=True, capture_output=True, check=False
    )
    assert parse.returncode == 0, parse.stdout + parse.stderr
