"""The entry scripts' command line: the --config flag, one-line errors for bad flags and configs, console logging.

The only module (with the scripts) that uses absl.app, absl.flags and ml_collections.config_flags.
"""

import functools
import logging as std_logging
import os
import re
import sys

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags
import tensorflow as tf

from utils import config_rules, devices
from utils import workdir as workdir_lib
from utils.errors import UserError


def exit_on_user_error(main):
  """Turns a UserError into one line on stderr and exit status 2 (no traceback); see training.Interrupted."""

  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except UserError as error:
      print(f"error: {error}", file=sys.stderr)
      # 2 for a bad input; 128 + N for a run stopped by signal N after saving (training.Interrupted).
      code = getattr(error, "exit_code", 2)
      if getattr(error, "exit_now", False):
        # A lost cluster worker (devices.WorkerLost): a normal exit runs TensorFlow's teardown, which waits
        # seconds for the lost peer. Nothing is left to write (logs are flushed line by line; the kernel
        # releases the workdir lock).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
      sys.exit(code)

  return wrapped


def define_config_flag(default="config.py:digits", flag_values=flags.FLAGS, argv=None):
  """Defines --config: a preset of config.py plus --config.FIELD=VALUE overrides. Returns the flag holder.

  Without --config on the command line, ml_collections parses the default and its overrides while the
  flag is defined, i.e. when the script is imported, where a bad override is a traceback nothing can
  catch. Naming the default on the command line (in argv, right after the program name) makes absl parse
  it with the other flags, in run_script's parser. Command lines with a --flagfile are left as they are.

  Args:
    default: "FILE:PRESET" used when the command line names none.
    flag_values, argv: absl's registry and the command line (sys.argv, edited in place); for tests.
  """
  command_line = sys.argv if argv is None else argv
  if not any(re.match(r"^--?(config|flagfile)(=|$)", arg) for arg in command_line[1:]):
    command_line.insert(1, f"--config={default}")
  return config_flags.DEFINE_config_file(
    "config",
    default,
    "Preset and overrides.",
    flag_values=flag_values,
    lock_config=True,
    sys_argv=None if argv is None else argv,
  )


_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def use_console_logging(chief):
  """absl logging is the scripts' console: this project's records as plain lines on the current stdout, at
  INFO on the chief and WARNING elsewhere (so printed once per job); other libraries' absl records keep absl's
  own handler and format, warnings and errors only (Model Garden's INFO chatter stays out)."""
  absl_logger = logging.get_absl_logger()
  for handler in [h for h in absl_logger.handlers if isinstance(h, _ConsoleHandler)]:
    absl_logger.removeHandler(handler)
  absl_logger.addHandler(_ConsoleHandler())
  root_handler = logging.get_absl_handler()
  if not any(isinstance(f, _OtherLibraries) for f in root_handler.filters):
    root_handler.addFilter(_OtherLibraries())  # this project's records are printed once, by _ConsoleHandler
  logging.set_verbosity(logging.INFO if chief else logging.WARNING)
  tf_logger = tf.get_logger()
  tf_logger.setLevel(std_logging.WARNING)  # TensorFlow's own INFO lines (strategy set-up) stay out
  tf_logger.propagate = False  # it has its own stderr handler; through absl's, each warning printed twice


def _from_this_project(record):
  # A virtual environment inside the checkout (.venv) holds other libraries: their paths have site-packages.
  return record.pathname.startswith(_PROJECT_ROOT) and "site-packages" not in record.pathname


class _ConsoleHandler(std_logging.StreamHandler):
  def __init__(self):
    super().__init__(sys.stdout)
    self.setFormatter(std_logging.Formatter("%(message)s"))
    self.addFilter(_from_this_project)


class _OtherLibraries(std_logging.Filter):
  def filter(self, record):
    return not _from_this_project(record) and record.levelno >= std_logging.WARNING


def run_script(main, workdir_flag="workdir"):
  """Runs an entry script's main(argv) under absl, as `app.run(exit_on_user_error(main))` did, and more.

  A bad command line (unknown preset, unknown config field, wrong type, unknown flag) is one `error:` line
  and exit 2 (validation.parse_flags); then, before main, the config is checked field by field
  (validation.validate_config) and the --workdir, if it exists, is locked for this process (lock_workdir;
  prepare_workdir locks one it creates; one on gs:// or another non-local file system runs unlocked).
  --help still prints the usage.
  """

  @functools.wraps(main)
  def checked_main(argv):
    config_rules.validate_config(flags.FLAGS["config"].value)
    workdir = flags.FLAGS[workdir_flag].value if workdir_flag in flags.FLAGS else None
    chief = devices.is_chief()
    if not chief:  # one job, one console output: the chief's (errors still reach stderr)
      sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the rest of the process)
    elif workdir and _is_directory(workdir):
      workdir_lib.lock_workdir(workdir)
    use_console_logging(chief)
    return main(argv)

  app.run(exit_on_user_error(checked_main), flags_parser=_parse_flags_or_exit)


def _is_directory(path):
  """tf.io.gfile.isdir, False where the file system cannot answer (no access to a bucket, say)."""
  try:
    return tf.io.gfile.isdir(path)
  except tf.errors.OpError:  # prepare_workdir then names the reason, or the script says the workdir is missing
    return False


def _parse_flags_or_exit(argv):
  try:
    return parse_flags(argv)
  except UserError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv, flag_values=flags.FLAGS, config_flag="config"):
  """Parses argv into flag_values (absl), every parsing failure raised as a one-line UserError.

  Returns the arguments left over, as absl's parser does. `--help` still prints usage and exits.
  """
  try:
    remaining = flag_values(argv)
  except flags.UnrecognizedFlagError as error:
    raise UserError(_unknown_flag_message(str(error))) from None
  except flags.IllegalFlagValueError as error:
    raise UserError(_illegal_value_message(str(error), flag_values)) from None
  except flags.Error as error:
    raise UserError(f"{_first_line(error)}; --helpfull lists the flags") from None
  except (AttributeError, KeyError) as error:
    # ml_collections raises these (outside absl's error types) for an override of a field the config lacks.
    raise UserError(_unknown_field_message(error, argv, flag_values, config_flag)) from None
  except OSError as error:
    # Overrides given for a config file that could not be loaded.
    raise UserError(_config_file_message(error, argv, config_flag)) from None
  if config_flag in flag_values:
    try:
      flag_values[config_flag].value.keys()
    except OSError as error:  # ml_collections defers a config file's load failure to the first access
      raise UserError(_config_file_message(error, argv, config_flag)) from None
    except AttributeError:
      pass  # not a ConfigDict: validate_config says so
  return remaining


def _first_line(error):
  lines = str(error).strip().splitlines()
  return lines[0] if lines else type(error).__name__


def _unknown_flag_message(message):
  """absl: "Unknown command line flag 'workdr'. Did you mean: workdir ?" -> one line with --workdir."""
  name = re.search(r"flag '([^']*)'", message)
  name = name.group(1) if name else message
  suggestions = re.search(r"Did you mean: (.*?) ?\?", message)
  if suggestions:
    names = ", ".join(f"--{s.strip()}" for s in suggestions.group(1).split(","))
    return f"unknown command line flag --{name}; did you mean {names}?"
  return f"unknown command line flag --{name}; --helpfull lists the flags"


_ARTICLES = {"int": "an int", "float": "a float", "bool": "true or false", "tuple": "a tuple such as '(0.3, 0.75)'"}


def _illegal_value_message(message, flag_values):
  """absl: "flag --NAME=VALUE: DETAIL" -> "invalid value --NAME=VALUE: DETAIL; expected ...", one line."""
  message = message.removeprefix("flag ")
  argument, _, detail = message.partition(": ")
  lines = [line.strip() for line in detail.strip().splitlines() if line.strip()]
  if "Error whilst parsing config file" in detail and lines:
    # ml_collections embeds the config file's traceback: its last line holds the reason.
    detail = re.sub(r"^[A-Za-z_.]*(Error|Exception): ", "", lines[-1])
  else:
    detail = " ".join(lines)
  name = argument.split("=", 1)[0].lstrip("-")
  expected = ""
  if name in flag_values:
    flag_type = flag_values[name].parser.flag_type()
    if flag_type in _ARTICLES:
      expected = f"; expected {_ARTICLES[flag_type]}"
  return f"invalid value {argument}: {detail}{expected}"


def _flag_argument(argv, name):
  """The value given to --name on the command line (the last one), or None."""
  value = None
  for index, arg in enumerate(argv):
    match = re.match(rf"^--?{re.escape(name)}(=(.*))?$", arg)
    if match:
      value = match.group(2) if match.group(1) else (argv[index + 1] if index + 1 < len(argv) else None)
  return value


def _overrides(argv, config_flag):
  """[(argument as typed, dotted field)] of every --config.FIELD=VALUE in argv."""
  found = []
  for arg in argv:
    match = re.match(rf"^--?(no)?{re.escape(config_flag)}\.([^=]+)", arg)
    if match:
      found.append((arg, match.group(2)))
  return found


def _unknown_field_message(error, argv, flag_values, config_flag):
  """The first override naming a field the config lacks, with ml_collections' close matches or the valid names."""
  # ml_collections' KeyError text: "'precison'\nDid you mean "precision" instead of "precison"?"
  suggestions = dict(
    (wrong, right) for right, wrong in re.findall(r'Did you mean "([^"]+)" instead of "([^"]+)"', str(error))
  )
  config_argument = _flag_argument(argv, config_flag)
  if config_argument is None and config_flag in flag_values and isinstance(flag_values[config_flag].default, str):
    config_argument = flag_values[config_flag].default
  try:
    preset = _load_config(config_argument)
  except Exception:  # pylint: disable=broad-except  (only used to word the message)
    preset = None
  for arg, field in _overrides(argv, config_flag):
    holder, path = preset, config_flag
    for part in field.split("."):
      if preset is None:
        break
      if not isinstance(holder, ml_collections.ConfigDict):
        return f"{arg}: {path} is a {type(holder).__name__}, not a section with fields"
      if part not in holder:
        if part in suggestions:
          hint = f"did you mean --{path}.{suggestions[part]}?"
        else:
          hint = f"its fields are {', '.join(sorted(holder.keys()))}"
        return f"{arg}: {path} has no field {part!r}; {hint}"
      holder, path = holder[part], f"{path}.{part}"
  key = error.args[0] if error.args else error
  return f"a --{config_flag} override names a field the config lacks ({key}); check the spelling"


def _load_config(argument):
  """The config a --config=FILE:PRESET argument names, without overrides (parsed in a registry of its own)."""
  registry, command_line = flags.FlagValues(), ["validation", f"--config={argument}"]
  config_flags.DEFINE_config_file("config", None, flag_values=registry, sys_argv=command_line)
  registry(command_line)
  return registry["config"].value


def _config_file_message(error, argv, config_flag):
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  reason = lines[-1] if lines else str(error)
  return (
    f"cannot load the config file of --{config_flag}={_flag_argument(argv, config_flag)} ({reason}); "
    f"pass --{config_flag}=config.py:PRESET"
  )
