"""Integrations with the systems users already run: Home Assistant's MQTT discovery and
Sparkplug B for SCADA hosts. Each reads the daemon's state through what the daemon hands it
(configs, the health document, results) and publishes on MQTT; nothing below imports them."""
