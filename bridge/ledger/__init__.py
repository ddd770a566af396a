"""The ledger: outbox, inbox, consents and the hash-chained audit log.

``states`` and ``audit`` are pure; ``sqlite`` is the durable store behind them.
"""
