"""The baseline the benchmark compares the daemon with: the loop people write by hand.

paho callback -> json.loads -> session.run (one reading) -> json.dumps -> publish, all in
paho's callback, as in most tutorials. Kept deliberately plain (but with TCP_NODELAY, so
the comparison is about the daemon, not about Nagle's algorithm).

    python scripts/baseline_loop.py --port 1883 --model m.onnx --input-topic in/# \\
        --output-topic out --field x
"""

from __future__ import annotations

import argparse
import json
import socket
from typing import Any

import numpy as np
import onnxruntime as ort
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


def main() -> None:
    parser = argparse.ArgumentParser(description="plain paho + onnxruntime loop")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--model", required=True)
    parser.add_argument("--input-topic", required=True)
    parser.add_argument("--output-topic", required=True)
    parser.add_argument("--field", default="x")
    parser.add_argument(
        "--qos", type=int, default=1, choices=(0, 1), help="subscribe and publish QoS (1)"
    )
    parser.add_argument("--client-id", default="baseline-loop")
    parser.add_argument(
        "--echo", action="store_true", help="skip inference: measures the MQTT transport alone"
    )
    args = parser.parse_args()

    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    item_shape = [d if isinstance(d, int) else 1 for d in session.get_inputs()[0].shape[1:]]
    output_names = [o.name for o in session.get_outputs()]

    def on_connect(
        client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        client.subscribe(args.input_topic, qos=args.qos)

    def on_message(client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if args.echo:
            client.publish(args.output_topic, message.payload, qos=args.qos)
            return
        reading = json.loads(message.payload)
        x = np.asarray(reading[args.field], dtype=np.float32).reshape([1, *item_shape])
        outputs = session.run(None, {input_name: x})
        result = {
            "id": reading.get("id"),
            "outputs": {
                name: value[0].tolist() for name, value in zip(output_names, outputs, strict=True)
            },
        }
        client.publish(args.output_topic, json.dumps(result), qos=args.qos)

    def on_socket_open(client: paho.Client, userdata: Any, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=args.client_id)
    client.on_connect = on_connect
    client.on_message = on_message
    client.on_socket_open = on_socket_open
    client.connect(args.host, args.port)
    print("ready", flush=True)
    client.loop_forever()


if __name__ == "__main__":
    main()
