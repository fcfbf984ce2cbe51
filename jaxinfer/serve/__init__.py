"""`jaxinfer serve`: an OpenAI-compatible HTTP server over the engine (the `serve` extra:
FastAPI + uvicorn + prometheus_client). protocol.py checks requests (host only), worker.py is
the engine thread, app.py the routes and streaming, metrics.py the Prometheus text."""
