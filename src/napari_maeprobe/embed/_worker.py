"""Entry point of the inference worker process (see ``engine.worker_main``).

``python -m napari_maeprobe.embed._worker READ_FD WRITE_FD [PARENT_PID]``. Ctrl-C in a terminal
reaches the whole process group: the caller handles it (and stops this worker), so SIGINT ends
the worker at once and quietly, with status 130, instead of printing a KeyboardInterrupt
traceback. The handler is installed before anything heavy is imported.
"""

import os
import signal
import sys


def _interrupted(signum, frame) -> None:
    os._exit(130)  # engine.EXIT_INTERRUPTED: no traceback, no exit handlers


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _interrupted)
    from napari_maeprobe.embed.engine import worker_main

    parent = int(sys.argv[3]) if len(sys.argv) > 3 else None
    sys.exit(worker_main(int(sys.argv[1]), int(sys.argv[2]), parent))
