"""The one exception type the entry scripts turn into a one-line message."""


class UserError(Exception):
  """A problem the user can fix: bad input, bad config, missing files.

  The message says what is wrong and what to do. Entry scripts print it on one
  line and exit with status 2 instead of showing a traceback.
  """
