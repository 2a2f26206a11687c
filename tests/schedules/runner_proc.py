"""A schedule runner in its own process, for the concurrency and crash tests.

    python -m tests.schedules.runner_proc MODE GO_FILE MARKER_FILE

Waits until GO_FILE exists (so several runners start together), then runs one pass of
`run_due_schedules` and prints its report as JSON. MODE:
- `run`: a normal pass;
- `hang-before-publish`: claims, then stops at the publish (writes MARKER_FILE and sleeps);
- `hang-after-publish`: publishes (the broker has acknowledged), then stops before recording.
The test SIGKILLs the process once MARKER_FILE appears.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import django


def main() -> None:
    mode, go_file, marker = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "iotplatform.settings")
    django.setup()

    from apps.devices.publisher import Publisher
    from apps.schedules.actions import run_due_schedules

    real = Publisher.publish_many

    def hang(*args, **kwargs):
        if mode == "hang-after-publish":
            real(*args, **kwargs)
        marker.write_text(str(os.getpid()))
        time.sleep(600)

    if mode != "run":
        Publisher.publish_many = hang  # type: ignore[method-assign]

    while not go_file.exists():
        time.sleep(0.005)
    report = run_due_schedules()
    print(json.dumps(asdict(report)), flush=True)


if __name__ == "__main__":
    main()
