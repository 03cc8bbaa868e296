"""Entry point of the inference worker process (see ``inference.worker_main``)."""

import sys

from napari_maeprobe.embed.engine import worker_main

if __name__ == "__main__":
    worker_main(int(sys.argv[1]), int(sys.argv[2]))
