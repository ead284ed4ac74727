"""Configuration: ``config.settings`` reads the environment and ``.env``."""
