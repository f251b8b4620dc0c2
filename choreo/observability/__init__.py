"""What a running worker shows about itself: metrics, traces, health endpoints, heartbeats.

Each concern is one module and the only importer of its library: ``metrics``
(prometheus_client), ``tracing`` (opentelemetry), ``http`` (the worker's HTTP port),
``heartbeat`` (liveness on the control exchange).
"""
