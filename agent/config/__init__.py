"""The configuration: the YAML file's schema, its loading and its diagnostics.

Imports only the bottom layer (``agent.errors``, ``agent.logs``, ``agent.durable``,
``agent.topics``, ``agent.strenum``): everything else reads its settings from here.
"""
