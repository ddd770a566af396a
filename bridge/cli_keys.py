"""``bridge keys rotate-data-key``: a new data key for encryption at rest, while serving.

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


def cmd_keys_rotate_data_key(args: argparse.Namespace) -> int:
    from bridge.config import load_config
    from bridge.ledger import open_store
    from bridge.ledger.seal import AESGCMSealer

    config = load_config(args.config)
    with open_store(config.store) as store:
        sealer = store.sealer
        if not isinstance(sealer, AESGCMSealer):
            raise ConfigError("encryption at rest is not configured: name the key-encryption"
                              " key in store.data_key_file or store.data_key_env",
                              location=f"{args.config}: store")
        with store.transaction("rotate data key") as tx:
            key_id = sealer.add_key(tx)
            sealer.load(tx, create=False)
    if args.json:
        print_json({"data_key": key_id})
    else:
        sys.stdout.write(f"data key {key_id} added; it seals from now on (older keys still"
                         " open what they sealed)\n")
    return 0


def add_keys_commands(sub: Any) -> None:
    """Add ``bridge keys``."""
    k = sub.add_parser("keys", help="keys of encryption at rest")
    ksub = k.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    r = ksub.add_parser("rotate-data-key", help="add a new data key, without stopping")
    r.add_argument("--config", required=True, help="the controller's configuration file (TOML)")
    add_json_option(r)
    r.set_defaults(func=cmd_keys_rotate_data_key)
