"""The one exception type the entry scripts turn into a one-line message."""


class UserError(Exception):
  """A problem the user can fix: bad input, bad config, missing files.

  The message says what is wrong and what to do. Entry scripts print it on one
  line and exit with status 2 instead of showing a traceback.
  """


class Interrupted(UserError):
  """The run was stopped by a signal after saving a checkpoint; exit with 128 + signal number."""

  def __init__(self, message, signal_number):
    super().__init__(message)
    self.exit_code = 128 + signal_number
