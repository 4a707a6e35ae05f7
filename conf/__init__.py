"""Hydra configuration groups (YAML) for fedrobust; schemas live in fedrobust.config."""
