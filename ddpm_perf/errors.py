"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input: the message says what is wrong and what to do."""

    exit_code = 2


class RunWarning(UserWarning):
    """Something the user should know but that does not stop the run (e.g. early_exit on weights
    never fine-tuned for it). The CLI prints it as one 'ddpm-perf: warning:' line."""


class PeerFailure(UserError):
    """Another process of a multi-process run died or stopped answering: this one stops too."""

    exit_code = 1


def dataclass_from_dict(cls, d: dict, what: str):
    """Build dataclass ``cls`` from JSON ``d``, naming unknown or missing fields as a UserError."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UserError(f"{what}: unknown field(s) {', '.join(unknown)}")
    try:
        return cls(**d)
    except TypeError as e:  # a missing required field
        raise UserError(f"{what}: {e}") from None
