"""``python -m linformer_train.profiling --worker``: the per-case worker process (CPU cases)."""

import sys

from linformer_train.profiling.measuring import _worker_main

if __name__ == "__main__":
    if "--worker" in sys.argv:
        _worker_main()
    else:
        sys.exit("use tools/profile.py; this module's main is the per-case worker")
