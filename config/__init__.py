"""Built-in configuration, shipped in the service package as `service.config`.

default.toml is the configuration `ringstream serve` runs without --config;
schemas.toml holds the record schemas of the built-in sources.
"""
