"""Offline posture: the environment that keeps every ML library from calling home.

medserve never downloads anything at run time. These variables make sure the libraries it
loads (and any engine process it starts) do not either: no model hub, no dataset hub, no
usage statistics, no telemetry.
"""

from __future__ import annotations

from collections.abc import MutableMapping

OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_HOST_IP": "127.0.0.1",
}


def apply_offline_env(environ: MutableMapping[str, str]) -> dict[str, str]:
    """Force the offline variables into ``environ``; return the ones that had other values.

    Forced, not defaulted: an operator's ``HF_HUB_OFFLINE=0`` must not open a path to the
    internet from a server that holds patient data.
    """
    changed = {k: environ[k] for k, v in OFFLINE_ENV.items() if k in environ and environ[k] != v}
    environ.update(OFFLINE_ENV)
    return changed
