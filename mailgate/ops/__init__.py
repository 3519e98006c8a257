"""Operations: structured logs and Prometheus metrics."""
