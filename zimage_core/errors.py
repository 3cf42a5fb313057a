"""User-facing errors.

Every error a user can cause (a missing file, a wrong kind of checkpoint, a bad size) is a
:class:`ZImageError` whose message says what is wrong, where, and how to fix it. The CLI prints
the message as one line and exits non-zero; the ComfyUI nodes let it reach the UI unchanged.
"""


class ZImageError(Exception):
    """An error caused by user input, with a message meant to be shown as is."""


class CheckpointError(ZImageError):
    """A weight file or folder is missing, unreadable, or not the kind that was expected."""


class Cancelled(ZImageError):
    """The user stopped a running job (sampling loop, download, training step)."""


class LoraError(ZImageError):
    """A LoRA file does not fit the model (unknown keys, wrong shapes) or is not a LoRA at all."""
