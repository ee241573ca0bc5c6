"""
The tools a model can call in a reply: <|python_start|> code <|python_end|> is run here and its
result is forced back as <|output_start|> result <|output_end|>.
- calculator: plain arithmetic and a few string methods on literals, in this process, in
  microseconds; it refuses everything else (None). The engine's fast path.
- run_python: any other code, as a program in the sandbox (nanochat.execution: standard library
  only, a time limit, no network); what is fed back is its stdout, or the error's last line.
The training data's tool outputs are python_output(...) of what the sandbox returns, so the model
sees at chat time exactly what it was trained on.
"""
import ast
import math
import operator

from nanochat.execution import ExecutionResult, execute_code

MAX_EXPR_CHARS = 1000
MAX_INT_BITS = 4096  # about 1233 decimal digits: bounds every intermediate integer
MAX_STR_CHARS = 10_000
STRING_METHODS = {"count", "upper", "lower", "strip", "replace", "split", "find"}
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARYOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class _Refused(Exception):
    pass


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _checked(x):
    """Refuse values that are too big or not plain results (inf/nan, complex, huge strings)."""
    if isinstance(x, bool):
        return x
    if isinstance(x, int):
        if x.bit_length() > MAX_INT_BITS:
            raise _Refused("integer too large")
    elif isinstance(x, float):
        if not math.isfinite(x):
            raise _Refused("not finite")
    elif isinstance(x, str):
        if len(x) > MAX_STR_CHARS:
            raise _Refused("string too long")
    elif isinstance(x, list):
        if sum(len(s) for s in x) > MAX_STR_CHARS or not all(isinstance(s, str) for s in x):
            raise _Refused("list too long")
    else:
        raise _Refused(f"{type(x).__name__} result")
    return x


def _eval(node):
    """Evaluate a whitelisted AST node. Anything not handled here is refused."""
    if isinstance(node, ast.Constant):
        if _is_number(node.value) or isinstance(node.value, str):
            return _checked(node.value)
        raise _Refused("constant")
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARYOPS:
        x = _eval(node.operand)
        if not _is_number(x):
            raise _Refused("unary op on a non-number")
        return _checked(_UNARYOPS[type(node.op)](x))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Add) and isinstance(a, str) and isinstance(b, str):
            return _checked(a + b)
        if not (_is_number(a) and _is_number(b)):
            raise _Refused("arithmetic on a non-number")  # also rules out "%" formatting and str * int
        if isinstance(node.op, ast.Pow):
            # decide before computing: 9**9**9 would take forever
            if abs(b) > MAX_INT_BITS:
                raise _Refused("exponent too large")
            if isinstance(a, int) and isinstance(b, int) and b > 0 and a.bit_length() * b > MAX_INT_BITS:
                raise _Refused("power too large")
        return _checked(_BINOPS[type(node.op)](a, b))
    if isinstance(node, ast.Call) and not node.keywords:
        args = [_eval(a) for a in node.args]
        if isinstance(node.func, ast.Name) and node.func.id == "len" and len(args) == 1:
            if not isinstance(args[0], (str, list)):
                raise _Refused("len of a non-string")
            return len(args[0])
        if isinstance(node.func, ast.Attribute) and node.func.attr in STRING_METHODS:
            obj = _eval(node.func.value)
            if not isinstance(obj, str) or not all(isinstance(a, (str, int)) and not isinstance(a, bool) for a in args):
                raise _Refused("string method on a non-string")
            return _checked(getattr(obj, node.func.attr)(*args))
    raise _Refused(type(node).__name__)


def _format(x):
    if isinstance(x, float):
        # integral floats print as integers (84/2 -> "42"); others with 12 significant digits
        return str(int(x)) if x.is_integer() and abs(x) < 1e15 else f"{x:.12g}"
    return x if isinstance(x, str) else str(x)


def calculator(expr: str) -> str | None:
    """Evaluate a tool call: arithmetic (+ - * / // % **, unary +/-, parentheses on int/float
    literals), string literals joined with +, the methods .count .upper .lower .strip .replace
    .split .find on strings and len(string). Nothing else: no names, other attributes or calls,
    subscripts, comprehensions, lambdas. Every intermediate value is bounded (ints up to
    MAX_INT_BITS bits, exponents checked before computing, finite floats, strings up to
    MAX_STR_CHARS). Returns the result as text (strings unquoted, integral floats as ints), or
    None if the expression is refused or fails (syntax error, division by zero, ...)."""
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
        return None
    try:
        tree = ast.parse(expr.strip(), mode="eval")
        return _format(_eval(tree.body))
    except (_Refused, SyntaxError, ValueError, TypeError, ArithmeticError, MemoryError, RecursionError):
        return None


PYTHON_OUTPUT_BYTES = 16 << 10  # stdout kept from a python call (the engine then caps it in tokens)


def python_output(result: ExecutionResult) -> str:
    """What a python call feeds back: stdout without its trailing newline; after a failure, the
    error's one line below what was printed ("ZeroDivisionError: division by zero", "timed out after 5 s")."""
    printed = result.stdout.rstrip()
    if result.success:
        return printed
    return f"{printed}\n{result.error}" if printed else result.error


def run_python(code: str, timeout: float = 5.0, stop=None) -> str:
    """Run a tool call's code in the sandbox -> python_output of it. stop: a threading.Event that
    kills the code early. Never raises: a sandbox that cannot start is reported as the output."""
    try:
        return python_output(execute_code(code, timeout=timeout, max_output_bytes=PYTHON_OUTPUT_BYTES, stop=stop))
    except Exception as e:  # noqa: BLE001 - the reply goes on, the model reads what went wrong
        return f"the sandbox failed: {type(e).__name__}: {e}"
