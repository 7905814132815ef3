"""Configuration: recipes (load, extend, hash), the ``key=value`` override parser, JSON Schemas."""
