"""Home Assistant MQTT discovery: one retained device config that makes the agent, its
models, pipelines and chosen results appear as entities."""
