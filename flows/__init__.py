"""nurture's Prefect flows; thin wiring over library code in ``nurture``.

A flow run without a Prefect server starts a throwaway local one. Out of the box that server tries to send
telemetry and, at shutdown, logs tracebacks about its own event recorder; neither concerns a nurture run.
These defaults keep a successful run clean and offline; anything set in the environment wins.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_SERVER_LEVEL", "CRITICAL")
# The throwaway server migrates its own database on first start; on a busy 2-core machine that can take longer
# than Prefect's default patience.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
