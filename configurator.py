"""Command-line settings for every script, after nanoGPT's configurator.py.

`python train.py config/t4.py --batch_size=8 --compile` applies the config file's assignments, then each
`--key=value` (or `--key value`, or a bare `--flag` for True). Values are Python literals checked against the
default's type; an unknown key is an error that suggests close matches. `--help` (or `-h`) lists the settings
with their defaults and the comment on each one's line in the script. `main_guard` turns a bad setting into
one `error: ...` line and exit status 2, and Ctrl+C into one line and exit status 130.
"""

import ast
import io
import linecache
import os
import sys
import tokenize

import core


class HelpRequested(Exception):
    """--help was given: main_guard prints the settings (defaults and comments) and exits with status 0."""

    def __init__(self, defaults, sources=(), comments=None):
        super().__init__("--help")
        self.defaults, self.sources, self.comments = defaults, list(sources), dict(comments or {})


def _literal(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string: --model=gpt


def wants_help(argv):
    return any(arg in ("--help", "-h") for arg in argv)


def parse_overrides(argv, defaults, allow_config_files=True, ignore_unknown=False, given=None, help_sources=(),
                    help_comments=None):
    """Apply `config/x.py` files and `--key=value` / `--key value` / `--flag` to a dict of defaults.

    Returns a new dict. Values are Python literals checked against the default's type; a key that is not
    a default is an error suggesting close matches (skipped with ignore_unknown, for a first pass that only
    needs to find which model's settings to add). A default of None accepts any value. `given`, a set, receives
    the keys that a config file or a flag set. `--help` raises HelpRequested (not in an ignore_unknown pass);
    help_sources are the files whose `name = value  # comment` lines describe the settings, help_comments
    describes those that have no such line."""
    if wants_help(argv) and not ignore_unknown:
        raise HelpRequested(defaults, help_sources, help_comments)
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
        if given is not None:
            given.add(key)

    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--help", "-h"):
            i += 1
            continue
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


def setting_comments(path):
    """{name: comment} for a Python file's module-level `name = value  # comment` lines, its class-level
    `name: type = value  # comment` fields (dataclass configs) and the `name=value,  # comment` entries of a
    module-level dict(...) call. Comments inside strings are not comments: the file is read with Python's own
    parser and tokenizer. A file that cannot be read gives {}."""
    text = "".join(linecache.getlines(path))
    try:
        tree = ast.parse(text)
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (SyntaxError, ValueError, tokenize.TokenError):
        return {}
    lines = {}   # setting name -> the line its definition starts on

    def targets(stmt):
        if isinstance(stmt, ast.Assign):
            return [t.id for t in stmt.targets if isinstance(t, ast.Name)]
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            return [stmt.target.id]
        return []

    for stmt in tree.body:
        for name in targets(stmt):
            lines.setdefault(name, stmt.lineno)
        value = getattr(stmt, "value", None)
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "dict":
            for kw in value.keywords:
                if kw.arg:
                    lines.setdefault(kw.arg, kw.value.lineno)
        if isinstance(stmt, ast.ClassDef):
            for inner in stmt.body:
                for name in targets(inner):
                    lines.setdefault(name, inner.lineno)
    line_comment = {tok.start[0]: tok.string.lstrip("#").strip() for tok in tokens if tok.type == tokenize.COMMENT}
    return {name: line_comment[line] for name, line in lines.items() if line in line_comment}


def help_text(defaults, sources=(), doc=None, fallback=None):
    """The script's docstring, then one line per setting: --name=default and its comment."""
    comments = {}
    for path in sources:
        for key, comment in setting_comments(path).items():
            comments.setdefault(key, comment)
    lines = [doc.strip(), ""] if doc and doc.strip() else []
    lines.append("settings (--key=value or --key value; defaults shown):")
    def show(v):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10_000:
            return f"{v:_}"
        if isinstance(v, str):
            return v if v and v.isprintable() and " " not in v else repr(v)
        return str(v)
    shown = {k: f"--{k}={show(v)}" for k, v in defaults.items()}
    width = min(40, max(map(len, shown.values()), default=0))
    for key in defaults:
        lines.append(f"  {shown[key]:<{width}}  {comments.get(key, (fallback or {}).get(key, ''))}".rstrip())
    return "\n".join(lines)


def _rank():
    return int(os.environ.get("RANK", "0") or 0)


def main_guard(fn):
    """Run a script's main: --help prints the settings (exit 0); a UsageError becomes one `error:` line on
    stderr and exit status 2 (under torchrun printed by rank 0 only); Ctrl+C one line and exit status 130."""
    try:
        fn()
    except HelpRequested as h:
        main = sys.modules.get("__main__")
        sources = h.sources or [getattr(main, "__file__", "")]
        print(help_text(h.defaults, sources, getattr(main, "__doc__", None), h.comments))
        sys.exit(0)
    except core.UsageError as e:
        if _rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if _rank() == 0:
            print("interrupted (Ctrl+C)", file=sys.stderr)
        sys.exit(130)
