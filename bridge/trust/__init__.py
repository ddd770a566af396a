"""Trust: keys, detached JWS signatures, signed receipts, partner registry, TLS contexts.

``bridge.trust.tls`` is the only module here that imports :mod:`ssl`; the rest is
plain synchronous code over plain data.
"""
