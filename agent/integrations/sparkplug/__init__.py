"""Sparkplug B: the agent as an edge node (NBIRTH/NDATA/NDEATH) with a device per pipeline
stream (DBIRTH/DDATA/DDEATH), on a clean MQTT session of its own."""
