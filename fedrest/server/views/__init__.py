"""The coordinator's HTTP API, one blueprint per area (the wire contract: docs/openapi.json, docs/API.md).

- :mod:`.nodes`: register, heartbeat, leave, the long-polled task, the global model download (workers).
- :mod:`.rounds`: update uploads (workers).
- :mod:`.admin`: token rotation, bans (the operator's admin token).
- :mod:`.monitoring`: health, status, Prometheus metrics, the dashboard, the OpenAPI description.
"""

API = "/api/v1"
