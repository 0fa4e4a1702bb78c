"""Presets: each file defines get_config() -> rexmoe_jax.config.Config."""
