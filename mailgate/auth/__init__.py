"""SMTP AUTH (RFC 4954): SASL mechanisms, the users file and failure throttling."""
