"""Where downloaded and decoded datasets live, whether AMBLE may download, and one checked download.

Shared by every dataset that can be fetched (the IDX family, CIFAR-10) so they agree on the cache
folder, the ``AMBLE_OFFLINE`` switch and on never leaving a half-written file behind.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.request
from pathlib import Path

from amble.errors import DataError

logger = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 10.0


def cache_dir(name: str) -> Path:
    """The per-user dataset folder ``${XDG_CACHE_HOME:-~/.cache}/amble/datasets/<name>``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "amble" / "datasets" / name


def offline() -> bool:
    """True when ``AMBLE_OFFLINE`` forbids downloads (``1``, ``true``, ``yes`` or ``on``)."""
    return os.environ.get("AMBLE_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def fetch(url: str, target: Path, md5: str | None) -> None:
    """Download ``url`` to ``target`` through a temp file renamed only once its md5 matches.

    Any network, HTTP or checksum failure raises :class:`DataError` naming the URL; ``target`` is then
    untouched. The timeout bounds each socket operation, so a dead mirror fails within seconds.
    """
    logger.info("downloading %s -> %s", url, target)
    digest = hashlib.md5(usedforsecurity=False)
    handle, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    temp = Path(temp_name)
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if md5 is not None and digest.hexdigest() != md5:
            raise DataError(f"{url} has md5 {digest.hexdigest()}, expected {md5} (a corrupt or changed file)")
        os.replace(temp, target)
    except (OSError, http.client.HTTPException, ValueError) as err:
        raise DataError(f"{url}: {err}") from err
    finally:
        temp.unlink(missing_ok=True)
