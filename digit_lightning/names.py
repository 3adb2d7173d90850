"""Short names a person can read, for runs and the values that set them apart: `lr=2.42e-4,bs=128`, `fold=3`.

Numbers keep 3 significant digits (`0.00024156772025296256` is `2.42e-4`); the full values stay in the run's config
and its HParams. Keys are their last part (`model.optimizer.lr` is `lr`), `batch_size` is `bs`, `weight_decay` `wd`.
No torch here: the sweep report and `--help` import it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

SHORT_KEYS = {"batch_size": "bs", "weight_decay": "wd", "max_epochs": "epochs", "label_smoothing": "smoothing"}


def _float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def short_value(value: Any) -> str:
    """A value as a person reads it: a number to 3 significant digits (`2.42e-4`, `0.05`, `128`), anything else as
    it is written."""
    number = _float(value)
    if number is None:
        return str(value)
    if number == int(number) and abs(number) < 1e6:
        return str(int(number))
    if 1e-2 <= abs(number) < 1e4:
        return f"{number:.3g}"
    mantissa, exponent = f"{number:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def short_key(key: str) -> str:
    """A dotted config key by its last part, abbreviated where it is long (`data.batch_size` is `bs`)."""
    last = key.rsplit(".", 1)[-1].rsplit("/", 1)[-1]
    return SHORT_KEYS.get(last, last)


def run_name(pairs: Iterable[tuple[str, Any]]) -> str:
    """`key=value,...` from (dotted key, value) pairs, keys and values shortened; full dotted keys where two short
    keys would read the same. "" for no pairs."""
    pairs = list(pairs)
    keys = [short_key(k) for k, _ in pairs]
    if len(set(keys)) < len(keys):
        keys = [k for k, _ in pairs]
    return ",".join(f"{k}={short_value(v)}" for k, (_, v) in zip(keys, pairs, strict=True))
