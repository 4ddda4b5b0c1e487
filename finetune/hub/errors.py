"""Hub errors: each names the repo, revision or file and the cause."""


class HubError(Exception):
    """Base class of hub failures."""


class RevisionNotFoundError(HubError):
    """The repo or revision does not exist in the hub."""


class IntegrityError(HubError):
    """A pulled file's sha256 does not match the revision's record; the file is not used."""


class UnsafeFileError(HubError):
    """A repo holds a pickle-format file, which medfm refuses to load."""
