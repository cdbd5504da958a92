"""Progress bars (tqdm) that stay quiet when disabled or when output is not a terminal in CI logs."""
from __future__ import annotations

from typing import Iterable

from tqdm.auto import tqdm


def progress_bar(it: Iterable, desc: str, enabled: bool = True, **kw):
    return tqdm(it, desc=desc, disable=not enabled, dynamic_ncols=True, mininterval=0.5, **kw)
