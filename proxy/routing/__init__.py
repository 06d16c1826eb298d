"""Many upstreams: endpoints and their health, balancing policies, model -> endpoints.

::

    endpoint.py   Endpoint: one upstream in rotation (client, weight, models, load, health)
    policies.py   least-busy, round-robin, session (rendezvous), load-aware: pick one
    vllmmetrics.py  the three vLLM gauges read from an upstream's /metrics text
    router.py     Router: the set of endpoints, model routing, failover, probes, reload
    catalog.py    GET /v1/models (and /models) as the union of the healthy upstreams' lists
"""
