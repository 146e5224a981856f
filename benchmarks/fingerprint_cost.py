"""What fingerprinting the weights costs at engine start, on a checkpoint of a realistic size.

Writes a synthetic checkpoint (``--files`` safetensors-named files of random bytes, ``--gb`` in all)
into ``--dir`` unless it already holds one, then times :func:`fingerprint_weights` in both modes, the
page cache dropped first where the machine allows it (root), and reports the bytes read and GB/s.
Example: ``python benchmarks/fingerprint_cost.py --dir /var/tmp/ckpt --gb 16 --out fingerprint.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from kvbm_core.fingerprint import fingerprint_weights

CHUNK = 64 << 20


def write_checkpoint(root: Path, gb: float, files: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    per_file = int(gb * 1e9 / files)
    for i in range(files):
        path = root / f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        if path.exists() and path.stat().st_size == per_file:
            continue
        with open(path, "wb") as f:
            left = per_file
            while left:
                n = min(CHUNK, left)
                f.write(os.urandom(n))
                left -= n
    (root / "config.json").write_text(json.dumps({"synthetic": True, "gb": gb}))


def drop_page_cache() -> bool:
    """True if the kernel's page cache was dropped (needs root), so reads come from the device."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--gb", type=float, default=16.0)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    began = time.perf_counter()
    write_checkpoint(args.dir, args.gb, args.files)
    print(f"checkpoint ready in {time.perf_counter() - began:.1f} s: {args.gb} GB in {args.files} files")
    rows = []
    for mode in ("sampled", "full", "sampled"):
        cold = drop_page_cache()
        fp = fingerprint_weights(str(args.dir), mode)
        rows.append({"mode": mode, "cold_cache": cold, "files": fp.files, "bytes_read": fp.bytes_read,
                     "seconds": round(fp.seconds, 4), "gbps": round(fp.bytes_read / fp.seconds / 1e9, 2),
                     "digest": fp.digest})
        print(json.dumps(rows[-1]))
    result = {"cpus": os.cpu_count(), "python": platform.python_version(), "checkpoint_gb": args.gb,
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
