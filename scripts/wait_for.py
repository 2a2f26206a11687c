#!/usr/bin/env python3
"""Wait until the MQTT broker accepts a connection, then exit 0 (or 1 after the timeout).

Procfile.embedded starts every process at once; the listener and the simulator run this first
so that they never race the embedded broker's start.

    python scripts/wait_for.py mqtt [URL] [--timeout SECONDS]    # URL defaults to $MQTT_URL
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apps.core.netcheck import mqtt_connack, wait_until  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("service", choices=["mqtt"])
    parser.add_argument("url", nargs="?", default=os.environ.get("MQTT_URL", ""))
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    if not args.url:
        parser.error("no URL given and MQTT_URL is not set")
    if wait_until(lambda: mqtt_connack(args.url), args.timeout, interval=0.3):
        return 0
    where = args.url.rpartition("@")[2]  # never print credentials
    print(f"wait_for: no MQTT broker at {where} after {args.timeout:g} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
