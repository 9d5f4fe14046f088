"""Command-line settings for every script, after nanoGPT's configurator.py.

`python train.py config/t4.py --batch_size=8 --compile` applies the config file's assignments, then each
`--key=value` (or `--key value`, or a bare `--flag` for True). Values are Python literals checked against the
default's type; an unknown key is an error that suggests close matches. `main_guard` turns a bad setting into
one `error: ...` line and exit status 2.
"""

import ast
import os
import sys

import core


def _literal(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string: --model=gpt


def parse_overrides(argv, defaults, allow_config_files=True, ignore_unknown=False):
    """Apply `config/x.py` files and `--key=value` / `--key value` / `--flag` to a dict of defaults.

    Returns a new dict. Values are Python literals checked against the default's type; a key that is not
    a default is an error suggesting close matches (skipped with ignore_unknown, for a first pass that only
    needs to find which model's settings to add). A default of None accepts any value."""
    result = dict(defaults)

    def assign(key, value, origin):
        if key not in defaults:
            if ignore_unknown:
                return
            raise core.UsageError(f"unknown setting {key!r} in {origin}{core.suggest(key, defaults)}")
        default = defaults[key]
        if default is not None and not core.type_ok(value, type(default)):
            raise core.UsageError(f"{origin}: {key}={value!r} should be a {type(default).__name__} "
                             f"like its default {default!r}")
        if isinstance(default, float) and isinstance(value, int):
            value = float(value)
        result[key] = value

    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            if not (allow_config_files and arg.endswith(".py")):
                raise core.UsageError(f"unexpected argument {arg!r}: use --key=value or a config/*.py file")
            if not os.path.isfile(arg):
                raise core.UsageError(f"config file {arg!r} not found")
            scope = {}
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), scope)
            for key, value in scope.items():
                if not key.startswith("_") and not callable(value) and not isinstance(value, type(os)):
                    assign(key, value, arg)
            i += 1
            continue
        body = arg[2:]
        if "=" in body:
            key, text = body.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, text = body, argv[i + 1]
            i += 2
        else:  # a bare --flag switches a boolean on
            key, text = body, "True"
            i += 1
        if key in defaults and isinstance(defaults[key], str):
            value = text  # strings are taken as typed, even when they look like numbers
        else:
            value = _literal(text)
        assign(key, value, f"--{key}")
    return result


def main_guard(fn):
    """Run a script's main, turning UsageError into one `error:` line on stderr and exit status 2."""
    try:
        fn()
    except core.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
