"""What this device is (CPU, board, accelerators) and which execution providers suit it.

Imports the bottom layer and ``agent.config`` only; never MQTT, models or the daemon.
"""
