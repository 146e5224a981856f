"""An engine process for the registration tests: kvbm's connector on the reference executor with the
profile named by ``DYN_KVBM_PROFILE``; it serves one small chat, prints ``serving`` and then waits.
SIGTERM ends it through Python's exit handlers (the connector closes: its lease is revoked);
SIGKILL ends it without them (the lease expires).

    python engine_process.py
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]  # clusterkit, engine_runs

from clusterkit import conversations, executor_config  # noqa: E402

from kvbm_core.testing import ReferenceExecutor  # noqa: E402
from kvbm_core.trtllm.connector import KvbmConnectorLeader, KvbmConnectorWorker  # noqa: E402

signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
executor = ReferenceExecutor(executor_config(), connector=(KvbmConnectorLeader, KvbmConnectorWorker))
executor.run(conversations(users=1, turns=1))
print("serving", flush=True)
while True:
    time.sleep(60)
