"""Run a Python script (llama.cpp's converter) offline, with medserve's egress guard on.

``python -m medserve.quantize.offline SCRIPT ARGS...``. The converter is third-party code
in its own process, where the guard installed by ``medserve quantize`` does not reach; this
bootstrap installs it there too, so a converter code path that tries a model hub fails
loudly instead of downloading.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

from medserve.privacy import EgressGuard, apply_offline_env


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m medserve.quantize.offline SCRIPT [ARGS...]")
    script = Path(sys.argv[1]).resolve()
    sys.argv = [str(script), *sys.argv[2:]]
    # As `python SCRIPT` would: the script's directory first, for its sibling packages.
    sys.path.insert(0, str(script.parent))
    apply_offline_env(os.environ)
    EgressGuard().install()
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
