"""``bridge keys rotate-data-key``: a new data key for encryption at rest, while serving.
``bridge keys seal-stored``: seal what the store holds from before encryption at rest
was turned on (:mod:`bridge.ledger.sealing`), while serving.

The new key is wrapped under the key-encryption key the configuration names and seals
from then on; values sealed before stay readable under their own data keys. Running
processes load the new key the first time they read a value it sealed and start sealing
with it when they reopen the store. Nothing stops.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bridge.cli_common import add_json_option, print_json
from bridge.errors import ConfigError


def _sealer(store: Any, config: Any) -> Any:
    """The store's AES-GCM sealer, or ConfigError naming the configuration's [store]."""
    from bridge.ledger.seal import AESGCMSealer

    if not isinstance(store.sealer, AESGCMSealer):
        raise ConfigError("encryption at rest is not configured: name the key-encryption"
                          " key in store.data_key_file or store.data_key_env",
                          location=f"{config}: store")
    return store.sealer


def cmd_keys_rotate_data_key(args: argparse.Namespace) -> int:
    from bridge.config import load_config
    from bridge.ledger import open_store

    config = load_config(args.config)
    with open_store(config.store) as store:
        sealer = _sealer(store, args.config)
        with store.transaction("rotate data key") as tx:
            key_id = sealer.add_key(tx)
            sealer.load(tx, create=False)
    if args.json:
        print_json({"data_key": key_id})
    else:
        sys.stdout.write(f"data key {key_id} added; it seals from now on (older keys still"
                         " open what they sealed)\n")
    return 0


def cmd_keys_seal_stored(args: argparse.Namespace) -> int:
    from bridge.config import load_config
    from bridge.ledger import open_store
    from bridge.ledger.sealing import plain_values, seal_stored

    config = load_config(args.config)
    with open_store(config.store) as store:
        _sealer(store, args.config)
        report = seal_stored(store, actor=config.controller.id)
        left = plain_values(store)
    if args.json:
        print_json({"sealed": report.sealed, "keyed": report.keyed,
                    "merged": report.merged, "plain_left": left})
    else:
        for column, n in sorted(report.sealed.items()):
            sys.stdout.write(f"sealed {n} values of {column}\n")
        for column, n in sorted(report.keyed.items()):
            sys.stdout.write(f"keyed {n} lookup keys of {column}\n")
        if report.merged:
            sys.stdout.write(f"dropped {report.merged} lookup keys in clear whose keyed form"
                             " was already stored\n")
        if not report.total and not report.merged:
            sys.stdout.write("nothing to seal: every value is sealed and every lookup key"
                             " keyed\n")
        for column, n in sorted(left.items()):
            sys.stdout.write(f"still plain: {n} of {column} (written while this ran;"
                             " run it again)\n")
    return 1 if left else 0


def add_keys_commands(sub: Any) -> None:
    """Add ``bridge keys``."""
    k = sub.add_parser("keys", help="keys of encryption at rest")
    ksub = k.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    r = ksub.add_parser("rotate-data-key", help="add a new data key, without stopping")
    r.add_argument("--config", required=True, help="the controller's configuration file (TOML)")
    add_json_option(r)
    r.set_defaults(func=cmd_keys_rotate_data_key)
    s = ksub.add_parser(
        "seal-stored",
        help="seal what was stored before encryption at rest was turned on, without stopping")
    s.add_argument("--config", required=True, help="the controller's configuration file (TOML)")
    add_json_option(s)
    s.set_defaults(func=cmd_keys_seal_stored)
