"""The README's Cluster section stays true: its subscriber snippet, run as written (pointed at the
test's nats-server), prints a running engine's cleared and stored events."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from clusterkit import cluster_profile, conversations, wait_for

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_subscriber_snippet_shows_the_events(nats_server, subscriber, engines, tmp_path):
    text = README.read_text()
    section = text[text.index("## Cluster") :]
    snippet = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    assert "nats://127.0.0.1:4222" in snippet
    script = tmp_path / "watch.py"
    script.write_text(snippet.replace("nats://127.0.0.1:4222", nats_server.url))

    sub = subscriber()
    engine = engines(cluster_profile([{"kind": "cpu", "num_blocks": 64}], nats_server.url, worker_id=21))
    engine.run(conversations(users=1, turns=1))
    wait_for(lambda: sub.index.held(21), what="the first events")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True)
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert events[0] == {"worker_id": 21, "storage_tier": "device",
                         "event": {"event_id": events[0]["event"]["event_id"], "data": "cleared", "dp_rank": 0}}
    stored = [e for e in events if isinstance(e["event"]["data"], dict) and "stored" in e["event"]["data"]]
    announced = {b["block_hash"] for e in stored for b in e["event"]["data"]["stored"]["blocks"]}
    assert announced == engine.leader_view()["host_pinned"]
