"""The one exception type users see: a one-line message naming the place and the fix."""


class DavspError(Exception):
    """A user-facing error. The CLI prints `davsp: error: <message>` and exits 2."""
