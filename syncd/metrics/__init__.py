"""Prometheus metrics of the node, the witness and the host shim.

``stats``: what the data path records per request (integer adds and a bisect into fixed
buckets, in the owner's own objects; nothing here imports prometheus_client). ``http``: the
small HTTP/1.1 server (h11, sans-IO, on Trio) that answers ``GET /metrics``. ``expose``: the
registry and the helpers that turn the owners' numbers into metric families at scrape time.
``node``, ``witness``, ``host``: one collector per daemon.
"""
