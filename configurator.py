"""
configurator.py: one configurator for the scripts, nanoGPT style. A script's configuration is its
module-level lines `name = value  # meaning`, read top to bottom; this file turns them into

  1. the keys and their defaults   - config_defaults(globals())
  2. overrides                     - parse_overrides(["--bits=3", ...], defaults): literals, checked by type
  3. --help                        - describe_config(__file__, defaults): every key, its default, its meaning

    defaults = configurator.config_defaults(globals())          # at the end of the config lines
    config, given = configurator.parse_overrides(sys.argv[1:], defaults)

Values are Python literals read with ast.literal_eval, never executed. train_kd.py and bench.py use it;
it imports no project file.
"""
import ast
import difflib
import tokenize

PLAIN_TYPES = (int, float, bool, str, type(None))   # what a config value can be


def config_defaults(namespace):
    """{name: value} of the config lines in a module's namespace (its globals()), in the order written:
    every name of a plain value (int, float, bool, str, None) that is not private (_name) or a CONSTANT."""
    return {k: v for k, v in namespace.items()
            if isinstance(v, PLAIN_TYPES) and not k.startswith("_") and not k.isupper()}


TYPE_NAMES = {int: "an integer", float: "a number", bool: "True or False (1 or 0)", str: "a string"}


def _wanted(default):
    return "an integer or None" if default is None else f"{TYPE_NAMES[type(default)]} (default {default!r})"


def unknown_key(key, keys):
    """The error text for an unknown --key: the nearest valid keys, if any are close, and where the rest are."""
    near = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    hint = f": did you mean {' or '.join('--' + k for k in near)}?" if near else ""
    return f"unknown option --{key}{hint} (--help lists every option with its default)"


def parse_value(key, raw, default):
    """The value of `--key=raw` for a key whose default is `default`: a Python literal of the default's type
    (an int where a float is wanted becomes a float; a None default is an int knob, e.g. group_size), or for
    a str default the text itself (a quoted literal loses its quotes). ValueError names the key otherwise."""
    try:
        value = ast.literal_eval(raw)       # a literal, never code
    except (ValueError, SyntaxError):
        value = raw                         # a bare word is a string
    if isinstance(default, str):
        return value if isinstance(value, str) else raw
    if isinstance(default, float) and type(value) is int:
        value = float(value)
    if default is None:
        ok = value is None or type(value) is int
    else:
        ok = value is None or type(value) is type(default)
    if not ok:
        raise ValueError(f"--{key} wants {_wanted(default)}, got {raw!r}")
    return value


def parse_overrides(argv, defaults, switches=()):
    """(config, given): `defaults` overridden by `--key=value` arguments, and the set of keys given.
    A bare `--key` of a key in `switches` means --key=1. ValueError for anything else, naming the argument
    and, for an unknown key, the nearest valid ones ("did you mean")."""
    config, given = dict(defaults), set()
    for arg in argv:
        if arg.startswith("--") and arg[2:] in switches:
            arg += "=1"                              # --quality switches that part on
        key, sep, raw = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not key:
            raise ValueError(f"argument {arg!r} is not of the form --key=value (--help lists the keys)")
        if key not in config:
            raise ValueError(unknown_key(key, list(config)))
        if not sep:
            raise ValueError(f"--{key} needs a value: --{key}=VALUE, {_wanted(defaults[key])}")
        config[key] = parse_value(key, raw, defaults[key])
        given.add(key)
    return config, given


def describe_config(source_path, defaults):
    """The --help text of a script configured by module-level lines `name = value  # meaning`: one line
    `--name=default  meaning` per key of `defaults` ({name: default}), in the order of the source; a
    full-line comment just above a key becomes the heading of the keys below it. The source is read with
    tokenize, so a '#' inside a string is no comment. ValueError names every key without a meaning on its
    line: that comment is the key's documentation."""
    meanings, order, headings, assigned, comment_lines = {}, [], {}, {}, {}
    with open(source_path, "rb") as f:
        tokens = list(tokenize.tokenize(f.readline))
    for token, following in zip(tokens, tokens[1:]):
        line, col = token.start
        if token.type == tokenize.NAME and col == 0 and following.string == "=":
            assigned[line] = token.string                                   # line number -> the name it assigns
            if token.string in defaults and token.string not in order:
                order.append(token.string)
                if line - 1 in comment_lines:
                    headings[token.string] = comment_lines[line - 1]
        elif token.type == tokenize.COMMENT:
            if line in assigned:
                meanings.setdefault(assigned[line], token.string.lstrip("#").strip())
            elif col == 0:
                comment_lines[line] = token.string.lstrip("# ").strip()
    missing = [name for name in defaults if not meanings.get(name)]
    if missing:
        raise ValueError(f"{source_path}: config keys without a '# meaning' comment on their line: {missing}")
    lines = []
    for name in order:
        if headings.get(name):
            lines.append(f"{headings[name]}:")
        lines.append(_describe_key(name, defaults[name], meanings[name]))
    return "\n".join(lines)


def _describe_key(name, default, meaning):
    plain = isinstance(default, str) and default.isprintable() and default and " " not in default
    shown = default if plain or not isinstance(default, str) else repr(default)   # bare, as typed, if it can be
    return (f"  --{name}={shown}".ljust(34) + f" {meaning}").rstrip()
