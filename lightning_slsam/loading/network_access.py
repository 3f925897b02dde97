"""Fetching pretrained weights, tokenizers and data over the network, with a one-line error when it cannot be reached.

Offline, transformers, timm and Hugging Face ``datasets`` retry their hub requests for about 45 s before they raise a
long traceback that does not say what to do instead. :func:`hugging_face_hub` checks once per process, with a single
TCP connection (no HTTP request, at most :data:`PROBE_TIMEOUT_S` seconds), whether the hub's host can be reached.
When it cannot, or when ``HF_HUB_OFFLINE`` is set, the fetch runs in huggingface_hub's offline mode: a copy in the
local cache is still used and nothing is requested, and a fetch that needs the network fails at once with a
:class:`NetworkUnavailableError`, one line that names what was fetched and the offline alternative.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import socket
import sys
from collections.abc import Iterator
from urllib.parse import urlsplit

#: seconds the reachability probe waits for its one TCP connection
PROBE_TIMEOUT_S = 3.0
#: the Hugging Face hub, unless ``HF_ENDPOINT`` names a mirror
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
#: with one of these set, the proxy reaches the hub, not this machine: the probe cannot tell and is skipped
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
_TRUE = {"1", "on", "yes", "true"}


class NetworkUnavailableError(ConnectionError):
    """Something had to be fetched over the network, which cannot be reached, and no local copy exists.

    The message is one line that starts with the argument that asked for it (``pretrained: ...``,
    ``model_name_or_path: ...``, ``download: ...``) and names the offline alternative.
    """


def hf_endpoint() -> str:
    """The Hugging Face hub's address: ``HF_ENDPOINT``, else ``https://huggingface.co``."""
    return os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT


@functools.cache
def host_reachable(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether one TCP connection to ``url``'s host and port opens within ``timeout_s`` seconds (default 3).

    No HTTP request is sent. True without trying when a proxy variable (:data:`PROXY_VARIABLES`) is set. The
    answer is cached for the process, so a run probes each host at most once.
    """
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return True
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:  # no DNS, no route, refused, timed out: all mean the fetch cannot work
        return False


def hub_offline_by_environment() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for the hub's offline mode."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@contextlib.contextmanager
def _hub_offline_mode() -> Iterator[None]:
    """huggingface_hub's offline mode (what ``HF_HUB_OFFLINE=1`` sets at import) for the block, then as it was.

    The libraries read ``huggingface_hub.constants.HF_HUB_OFFLINE`` at each request, so setting it here takes effect
    although the environment variable is read only at import; ``datasets`` keeps its own copy, set too.
    """
    patched: list[tuple[object, str, object]] = []
    for module_name in ("huggingface_hub.constants", "datasets.config"):
        if module_name == "datasets.config" and module_name not in sys.modules:
            continue  # datasets is imported before the block by its caller (importing it costs seconds)
        if module_name not in sys.modules and importlib.util.find_spec(module_name.split(".")[0]) is None:
            continue
        module = importlib.import_module(module_name)
        if hasattr(module, "HF_HUB_OFFLINE"):
            patched.append((module, "HF_HUB_OFFLINE", module.HF_HUB_OFFLINE))
            module.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for module, attribute, value in reversed(patched):
            setattr(module, attribute, value)


@contextlib.contextmanager
def hugging_face_hub(argument: str, what: str, alternative: str) -> Iterator[None]:
    """Run a fetch from the Hugging Face hub; offline, fail at once in one line instead of retrying.

    Online this does nothing. Offline (``HF_HUB_OFFLINE`` set, or :func:`host_reachable` false for
    :func:`hf_endpoint`) the block runs in huggingface_hub's offline mode, so a cached copy is used, and an
    ``OSError`` / ``ValueError`` / ``RuntimeError`` it raises becomes a :class:`NetworkUnavailableError`:
    ``"<argument>: cannot fetch <what>: <why>, ... (<the error's first line>); <alternative>"``, with the original
    error as its cause. Keep only the fetch inside the block.

    Args:
        argument: the argument or config key that asked for the fetch, first in the message (``"pretrained"``).
        what: what was fetched, e.g. ``"timm's vit_small_patch16_224 weights from https://huggingface.co"``.
        alternative: the offline way, e.g. ``"use model.pretrained=false or model.weights=<file>"``.
    """
    by_environment = hub_offline_by_environment()
    if not by_environment and host_reachable(hf_endpoint()):
        yield
        return
    why = "HF_HUB_OFFLINE is set" if by_environment else f"{hf_endpoint()} cannot be reached"
    with _hub_offline_mode():
        try:
            yield
        except (OSError, ValueError, RuntimeError) as error:
            reason = (str(error).strip().splitlines() or [""])[0][:160]
            raise NetworkUnavailableError(
                f"{argument}: cannot fetch {what}: {why}, and the local cache cannot serve it "
                f"({type(error).__name__}: {reason}); {alternative}"
            ) from error
