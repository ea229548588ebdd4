"""MQTT: connections, acknowledgements, retained state, the outbox and delivery modes.

Imports the bottom layer and ``agent.config`` only: it moves bytes and knows nothing of
models, pipelines or updates.
"""
