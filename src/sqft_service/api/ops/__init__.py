"""Operating the service: request ids, Prometheus metrics (``GET /metrics``) and readiness (``GET /ready``)."""
