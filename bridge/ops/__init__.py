"""Operations: the local-only port an operator and a monitoring system look at.

``/healthz`` (the process answers), ``/readyz`` (store, certificates, partners),
``/metrics`` (Prometheus text format) and ``/`` (the status page, server-rendered HTML
with no external assets). :mod:`bridge.ops.metrics` is where other parts of the bridge
register what they want measured.
"""
