"""An engine process for the registration tests: kvbm's connector on the reference executor with the
profile named by ``DYN_KVBM_PROFILE``; it serves one small chat, prints ``serving`` and then waits
(the test kills it).

    python engine_process.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest import conversations, executor_config  # noqa: E402

from kvbm_core.testing import ReferenceExecutor  # noqa: E402
from kvbm_core.trtllm.connector import KvbmConnectorLeader, KvbmConnectorWorker  # noqa: E402

executor = ReferenceExecutor(executor_config(), connector=(KvbmConnectorLeader, KvbmConnectorWorker))
executor.run(conversations(users=1, turns=1))
print("serving", flush=True)
while True:
    time.sleep(60)
