"""The TOML configuration: schema, loading and validation."""
