"""Settings for platform processes that a browser test starts (daphne, the listener).

The same settings as production code, pointed at the databases of the running test session:
pytest-django renames them (SQLite `TEST.NAME` files, PostgreSQL `test_…`), and a subprocess
would otherwise open the development ones. The test passes the names in
`IOT_TEST_DATABASE_NAMES` (JSON: alias -> name); the channel layer's SQLite database is one
of them in the embedded mode, so the test process and its servers share one layer.
"""

import json
import os

from iotplatform.settings import *  # noqa: F403
from iotplatform.settings import DATABASES

for _alias, _name in json.loads(os.environ.get("IOT_TEST_DATABASE_NAMES", "{}")).items():
    if _alias in DATABASES:
        DATABASES[_alias]["NAME"] = _name
