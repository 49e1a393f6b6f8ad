"""The error a run's settings raise: a leaf module, so that any module can refuse a setting
without importing the config machinery (``config_utils`` re-exports it)."""


class ConfigError(ValueError):
    """A setting or a combination of settings that cannot run; the message names the fix."""
