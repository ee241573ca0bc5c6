"""Override a script's module-level defaults from a config file and the command line.

A script declares its options as plain module-level variables, then calls

    config = configure(globals())

Command line: `[CONFIG_FILE.py] [--key=value | --key value | --flag | -x value] ...`
- CONFIG_FILE.py: executed in a fresh namespace; its top-level assignments override defaults.
- values are Python literals (ast.literal_eval), type-checked against the default; a str default
  takes the raw text when it is not a quoted literal, so `--run=dummy` works.
- an unknown key exits with code 2, listing the valid keys; `--help` lists every key and exits 0.
"""
import ast
import difflib
import os
import sys

SIMPLE_TYPES = (int, float, bool, str, type(None))
_NOT_LITERAL = object()  # parse_value: the text is not a Python literal
BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}


class ConfigError(Exception):
    pass


def _is_simple(value) -> bool:
    if isinstance(value, SIMPLE_TYPES):
        return True
    if isinstance(value, (tuple, list)):
        return all(isinstance(v, SIMPLE_TYPES) for v in value)
    return False


def config_keys(globals_dict: dict) -> list:
    """The script's options: public module-level names bound to simple values, in definition order."""
    return [k for k, v in globals_dict.items() if not k.startswith("_") and _is_simple(v)]


def _type_name(value) -> str:
    return "None" if value is None else type(value).__name__


def check_type(key: str, value, default):
    """Return `value` converted to the default's type, or raise ConfigError."""
    if default is None:
        if not _is_simple(value):
            raise ConfigError(f"--{key}: expected a simple literal, got {value!r}")
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, (tuple, list)):
        if isinstance(value, (tuple, list)) and _is_simple(value):
            return type(default)(value)
    raise ConfigError(f"--{key}: expected {_type_name(default)} (default {default!r}), got {_type_name(value)} {value!r}")


def parse_value(key: str, raw: str, default):
    """Parse command-line text for `key` as a Python literal checked against `default`."""
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = _NOT_LITERAL
    if isinstance(default, str):
        # --run=dummy, --tag=123, --prompt='hi': a quoted literal is unquoted, anything else is taken as is
        return value if isinstance(value, str) else raw
    if isinstance(default, bool) and raw.lower() in BOOL_WORDS:
        return BOOL_WORDS[raw.lower()]
    if isinstance(default, float) and value is _NOT_LITERAL:
        try:
            return float(raw)  # "inf", "nan"
        except ValueError:
            pass
    if isinstance(default, (tuple, list)) and (value is _NOT_LITERAL or isinstance(value, (str, int, float))):
        # --tasks=a,b,c or --tasks=a: comma-separated, each item parsed like its default's items
        item_default = default[0] if default else ""
        return type(default)(parse_value(key, item.strip(), item_default) for item in raw.split(",") if item.strip())
    if default is None and value is _NOT_LITERAL:
        return raw  # e.g. --model_tag=d4 with model_tag = None
    if value is _NOT_LITERAL:
        raise ConfigError(f"--{key}: cannot parse {raw!r} as a Python literal (expected {_type_name(default)})")
    return check_type(key, value, default)


def _unknown_key_message(key: str, keys: list, where: str = "") -> str:
    msg = f"Unknown config key {key!r}{where}."
    close = difflib.get_close_matches(key, keys, n=3)
    if close:
        msg += " Did you mean: " + ", ".join(close) + "?"
    msg += "\nValid keys: " + ", ".join(keys)
    return msg


def _help_text(globals_dict: dict, keys: list, values: dict) -> str:
    doc = (globals_dict.get("__doc__") or "").strip()
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "script"
    lines = [doc, ""] if doc else []
    lines.append(f"usage: {prog} [CONFIG_FILE.py] [--key=value ...]")
    lines.append("options (key, type, value):")
    width = max((len(k) for k in keys), default=0)
    for k in keys:
        lines.append(f"  --{k:<{width}}  {_type_name(globals_dict[k]):<5}  {values[k]!r}")
    return "\n".join(lines)


def _apply_config_file(path: str, defaults: dict, values: dict) -> dict:
    """Run the config file; return {key: value} for its top-level assignments (checked)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    # the line of each top-level assignment, so errors can point at it
    lines = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
        for t in targets:
            for name in ast.walk(t):
                if isinstance(name, ast.Name):
                    lines[name.id] = node.lineno
    namespace = {"__file__": os.path.abspath(path), "__name__": "__config__"}
    try:
        exec(compile(tree, path, "exec"), namespace)
    except Exception as e:  # a config file is user code: report where it failed
        raise ConfigError(f"{path}: error while executing: {type(e).__name__}: {e}") from None
    overrides = {}
    for key, lineno in lines.items():
        if key.startswith("_") or key not in namespace or not _is_simple(namespace[key]):
            continue  # helpers, imports, functions
        where = f"{path}:{lineno}"
        if key not in defaults:
            raise ConfigError(_unknown_key_message(key, list(defaults), f" at {where}"))
        try:
            overrides[key] = check_type(key, namespace[key], defaults[key])
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    return overrides


def _parse_argv(argv: list, defaults: dict, aliases: dict):
    """Yield (key, raw_text_or_True) pairs and detect --help; raise ConfigError on bad input."""
    pairs, want_help, i = [], False, 0
    alias_flags = {f"-{a}" for a in aliases}
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            want_help = True
            continue
        if arg.startswith("--"):
            body = arg[2:]
        elif arg.startswith("-") and arg.split("=", 1)[0] in alias_flags:
            body = arg[1:]
        else:
            raise ConfigError(f"unexpected argument {arg!r}: expected --key=value (a config file may only come first)")
        name, eq, raw = body.partition("=")
        name = aliases.get(name, name)
        key = name.replace("-", "_")
        if key not in defaults:
            raise ConfigError(_unknown_key_message(key, list(defaults)))
        if not eq:
            nxt = argv[i] if i < len(argv) else None
            takes_next = nxt is not None and not nxt.startswith("--") and not nxt.split("=", 1)[0] in alias_flags
            if isinstance(defaults[key], bool) and not (takes_next and nxt.lower() in BOOL_WORDS):
                pairs.append((key, True))  # bare --flag
                continue
            if not takes_next:
                raise ConfigError(f"--{key}: missing value (use --{key}=VALUE)")
            raw = nxt
            i += 1
        pairs.append((key, raw))
    return pairs, want_help


def configure(globals_dict: dict, argv=None, aliases=None) -> dict:
    """Apply a config file and --key=value overrides to `globals_dict` in place.

    Returns {key: final value} for every option (for the run's config snapshot).
    Bad input prints a message and exits with code 2; --help prints the options and exits 0.
    """
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--"]  # `-m scripts.x -- ...` as under torchrun
    aliases = dict(aliases or {})
    keys = config_keys(globals_dict)
    defaults = {k: globals_dict[k] for k in keys}
    values = dict(defaults)
    rank0 = int(os.environ.get("RANK", 0)) == 0
    applied = []
    try:
        if argv and not argv[0].startswith("-"):
            config_file = argv.pop(0)
            overrides = _apply_config_file(config_file, defaults, values)
            values.update(overrides)
            applied += [(k, v, config_file) for k, v in overrides.items()]
        pairs, want_help = _parse_argv(argv, defaults, aliases)
        if want_help:
            if rank0:
                print(_help_text(globals_dict, keys, values))
            raise SystemExit(0)
        for key, raw in pairs:
            value = raw if raw is True else parse_value(key, raw, defaults[key])
            if not (raw is True or _is_simple(value)):
                raise ConfigError(f"--{key}: {raw!r} is not a simple value")
            values[key] = value
            applied.append((key, value, "command line"))
    except ConfigError as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    globals_dict.update(values)
    if rank0:
        for key, value, source in applied:
            print(f"config: {key} = {value!r}  ({source})")
    return values
