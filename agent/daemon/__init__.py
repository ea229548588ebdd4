"""The daemon: builds every part from the config, runs them, reloads and stops them.

May import every package except ``agent.cli``.
"""
