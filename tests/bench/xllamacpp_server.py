"""llama.cpp's native server, in-process through the xllamacpp wheel, until SIGTERM.

python tests/bench/xllamacpp_server.py MODEL.gguf PORT PARALLEL THREADS CTX_PER_SLOT
"""

from __future__ import annotations

import signal
import sys
import threading

import xllamacpp


def main() -> None:
    model, port, parallel, threads, ctx = sys.argv[1:6]
    params = xllamacpp.CommonParams()
    params.model.path = model
    params.port = int(port)
    params.n_parallel = int(parallel)
    params.n_ctx = int(ctx) * int(parallel)  # llama-server splits n_ctx across its slots
    params.cpuparams.n_threads = int(threads)
    params.cpuparams_batch.n_threads = int(threads)
    params.offline = True
    server = xllamacpp.Server(params)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    sys.stdout.write(f"listening {server.listening_address}\n")
    sys.stdout.flush()
    stop.wait()
    del server


if __name__ == "__main__":
    main()
