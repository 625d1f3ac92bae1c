"""The one exception type for errors a user can cause (bad config, bad checkpoint, bad input).

The CLI prints ``str(err)`` on one line and exits non-zero; anything else escaping is a bug.
"""


class DeepSeekError(Exception):
    """A user-facing error with a one-line message naming the problem."""


def _numpy_bool(value) -> bool:
    # (numpy not imported here: ``np.bool_``'s class is named "bool" in numpy 2, "bool_" before)
    return type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")


def check_bool(name: str, value) -> bool:
    """``value`` if it is a bool (numpy's too), else a :class:`DeepSeekError`: a string such as
    ``"no"`` is truthy, and taking it as ``True`` would do the opposite of what was meant."""
    if not isinstance(value, bool) and not _numpy_bool(value):
        raise DeepSeekError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_int(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int if it is an integer (not a bool) in ``[lo, hi]``, else a
    :class:`DeepSeekError` naming the range."""
    import numbers
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and not _numpy_bool(value)
    if not ok or (lo is not None and value < lo) or (hi is not None and value > hi):
        want = ("an integer" + (f" >= {lo}" if lo is not None and hi is None else "")
                + (f" in [{lo}, {hi}]" if lo is not None and hi is not None else "")
                + (f" <= {hi}" if hi is not None and lo is None else ""))
        raise DeepSeekError(f"{name} must be {want}, got {value!r}")
    return int(value)
