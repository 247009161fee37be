"""The one exception type ensdiv raises for bad input at its public edge."""


class EnsdivError(ValueError):
    """Bad input to a public ensdiv function or command (unknown name, wrong shape or range).

    A subclass of ``ValueError`` so callers that already catch ``ValueError`` keep working; the
    CLI prints its message as one line and exits non-zero.

    Example:
        >>> raise EnsdivError("unknown arch 'vgg'; choose one of: cnn, mlp, resnet20")
        Traceback (most recent call last):
        ...
        ensdiv.errors.EnsdivError: unknown arch 'vgg'; choose one of: cnn, mlp, resnet20
    """


def check_choice(kind: str, value: str, choices: "list[str] | tuple[str, ...]") -> str:
    """Return ``value`` if it is one of ``choices``, else raise an error listing them.

    Example:
        >>> check_choice("norm", "linf", ["linf", "l2"])
        'linf'
    """
    if value not in choices:
        raise EnsdivError(f"unknown {kind} {value!r}; choose one of: {', '.join(sorted(choices))}")
    return value
