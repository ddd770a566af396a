"""What the wire rules cost: canonical JSON, a TLS handshake with the listener's
settings, and the per-record certificate probe. Prints medians (ms or µs).

    .venv/bin/python bench/wire.py

The machine is shared: figures move by ±30 % from run to run.
"""

from __future__ import annotations

import ssl
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import orjson
import rfc8785

from bridge.conformance.envelope import build_claim
from bridge.link.tlsgate import probe_presented_certificates
from bridge.trust.jws import canonical_json, canonical_json_v1
from bridge.trust.pki import init_dev_pki
from bridge.trust.tls import client_context, server_context


def median_ms(fn: Callable[[], object], repeat: int = 7, number: int = 200) -> float:
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter() - start) / number * 1e3)
    return statistics.median(runs)


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, records: int = 0) -> None:
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    cli = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    done = [False, False]
    while not all(done):
        for i, (obj, out, peer_in) in enumerate(((cli, c_out, s_in), (srv, s_out, c_in))):
            if not done[i]:
                try:
                    obj.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            data = out.read()
            if data:
                peer_in.write(data)
    for _ in range(records):
        cli.write(b"x" * 512)
        s_in.write(c_out.read())
        srv.read(4096)


def main() -> None:
    claim = build_claim(sender="hospital-a", receiver="insurer-b")
    plain = {k: v for k, v in claim.items() if k != "signature"}
    size = len(orjson.dumps(plain))
    print(f"canonical JSON of a {size / 1024:.1f} KB claim (median ms):")
    print(f"  rfc8785 package          {median_ms(lambda: rfc8785.dumps(plain)):.3f}")
    print(f"  bridge canonical_json    {median_ms(lambda: canonical_json(plain)):.3f}"
          "  (falls back to rfc8785: the sample has an integral amount)")
    money = {**plain, "entry": [e for e in plain["entry"]]}
    money["entry"][5] = {"resource": {"total": {"value": 8123.51}}}
    print(f"  canonical_json, fast path {median_ms(lambda: canonical_json(money)):.3f}"
          "  (no integral doubles: orjson writes the same bytes)")
    print(f"  version 1 form (orjson)  {median_ms(lambda: canonical_json_v1(plain)):.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        pki = init_dev_pki(Path(tmp), ["hospital-a", "insurer-b"], now=datetime.now(UTC))
        s, c = pki.controllers["insurer-b"], pki.controllers["hospital-a"]
        hardened = server_context(s.tls_cert, s.tls_key, pki.ca_cert)
        loose = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        loose.load_cert_chain(s.tls_cert, s.tls_key)
        loose.load_verify_locations(pki.ca_cert)
        loose.verify_mode = ssl.CERT_REQUIRED
        client = client_context(c.tls_cert, c.tls_key, pki.ca_cert)
        print("mutual TLS 1.3 handshake, both sides in one thread (median ms):")
        print(f"  Python defaults (tickets, session cache, all groups) "
              f"{median_ms(lambda: handshake(loose, client), number=50):.3f}")
        print(f"  listener settings (no resumption, 3 groups)          "
              f"{median_ms(lambda: handshake(hardened, client), number=50):.3f}")
        probed = server_context(s.tls_cert, s.tls_key, pki.ca_cert)
        probe_presented_certificates(probed)
        print(f"  with the certificate probe                           "
              f"{median_ms(lambda: handshake(probed, client), number=50):.3f}")
        n = 200
        base = median_ms(lambda: handshake(hardened, client, records=n), number=10)
        with_probe = median_ms(lambda: handshake(probed, client, records=n), number=10)
        print(f"probe cost per application record: {(with_probe - base) / n * 1e3:.2f} µs "
              f"(handshake + {n} records: {base:.2f} ms without, {with_probe:.2f} ms with)")


if __name__ == "__main__":
    main()
