"""
Tests of nanochat.execution: the sandbox for model-written Python.

    nice -n 19 python -m pytest tests/test_execution.py -q

The escape table (ESCAPES, at the bottom) runs every attempt against both mechanisms: bubblewrap
(skipped where it cannot start, unless NANOCHAT_REQUIRE_BUBBLEWRAP=1, which .ci/run sets) and the
fallback, where the rows it cannot hold are marked xfail with the reason (strict where its outcome
is known: as root with setpriv and unshare, as in CI). Every row checks
that the attempt failed (the secret is not in the output, the host file does not exist, the server
saw no connection, the caller is alive), not merely that the code raised. Nothing touches the
network: the one server listens on 127.0.0.1 and is the test's own.
"""
import ast
import glob
import json
import os
import pathlib
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from nanochat import execution
from nanochat.execution import (ExecutionResult, execute_code, isolation, network_namespace_available,
                                privilege_drop_available)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = "network access is disabled in the sandbox"
MECHANISMS = ["bubblewrap", "fallback"]

# Code that digs past the Python-level guards: the real ctypes, and libc through it.
UNGUARD = ("import os, sys, time\nfor m in ('ctypes', '_ctypes'):\n    sys.modules.pop(m, None)\n"
           "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n")


def bubblewrap_or_skip():
    if isolation() != "bubblewrap":
        if os.environ.get("NANOCHAT_REQUIRE_BUBBLEWRAP"):
            pytest.fail(f"NANOCHAT_REQUIRE_BUBBLEWRAP is set but the sandbox is the {isolation()}")
        pytest.skip(isolation())


@pytest.fixture(params=MECHANISMS)
def mechanism(request):
    if request.param == "bubblewrap":
        bubblewrap_or_skip()
    return request.param


def run(mechanism, code, **kw):
    return execute_code(code, bubblewrap=mechanism == "bubblewrap", **kw)


def alive(pid):
    """pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


# ----------------------------------------------------------------------------- behaviour

def test_isolation_names_the_mechanism():
    assert isolation() == "bubblewrap" or isolation().startswith("fallback: ")


def test_normal_code_returns_stdout(mechanism):
    r = run(mechanism, "import math\nprint(math.factorial(5))\nprint(sum(range(4)))")
    assert r == ExecutionResult(success=True, stdout="120\n6\n", stderr="", error=None)


def test_exception_is_reported(mechanism):
    r = run(mechanism, "print('before')\n1 / 0")
    assert not r.success and r.stdout == "before\n"
    assert r.error == "ZeroDivisionError: division by zero" and "Traceback" in r.stderr


def test_stop_event_kills_the_code_early(mechanism):
    # a chat reply cancelled while its python call runs: the code dies now, not at the time limit
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    t0 = time.monotonic()
    r = run(mechanism, "while True:\n    pass", timeout=30.0, stop=stop)
    assert not r.success and r.error == "stopped" and time.monotonic() - t0 < 5.0
    r = run(mechanism, "print('fine')", stop=threading.Event())  # never set: an ordinary run
    assert r.success and r.stdout == "fine\n"


def test_death_by_signal_is_named(mechanism):
    r = run(mechanism, UNGUARD + "ctypes.string_at(0)")  # a NULL read: SIGSEGV (bwrap reports 128 + 11)
    assert not r.success and r.error == "killed by signal SIGSEGV"


def test_runs_as_nobody_in_a_working_dir_of_its_own(mechanism):
    r = run(mechanism, "import os\nopen('inside.txt', 'w').write('hello')\n"
                       "print(open('inside.txt').read(), os.getuid(), os.getcwd(), sorted(os.environ))")
    assert r.success, r.stderr
    text, uid, workdir, env = r.stdout.split(" ", 3)
    assert text == "hello" and not os.path.exists(workdir)  # a tmpfs inside bwrap; removed by the fallback
    if mechanism == "bubblewrap" or privilege_drop_available():
        assert uid == "65534"
    if mechanism == "bubblewrap":
        assert workdir == "/sandbox" and set(ast.literal_eval(env)) <= {"HOME", "LANG", "LC_CTYPE", "PWD"}
    else:
        assert os.path.basename(workdir).startswith("nanochat-exec-")


def test_output_beyond_the_cap_is_cut_and_said(mechanism):
    r = run(mechanism, "print('x' * 5000)", max_output_bytes=1000)
    assert r.success and r.output_truncated and r.stdout == "x" * 1000 + "\n[output truncated]"


def test_standard_library_only_unless_packages_are_asked_for(mechanism):
    assert "No module named 'numpy'" in run(mechanism, "import numpy").error
    r = run(mechanism, "import numpy\nprint(numpy.arange(3).sum())", packages=True)
    assert r.success and r.stdout == "3\n", r.stderr
    # the project itself is never importable (its editable install needs .pth processing, and
    # under bubblewrap its files are not there at all)
    assert "No module named 'nanochat'" in run(mechanism, "import nanochat", packages=True).error


def test_guards_hold_however_the_module_is_reached(mechanism):
    # socket, shutil and subprocess are guarded as the code imports them (not up front, which would
    # more than double the start-up time): directly, through the C module, or inside another module
    for code in ("import _socket\n_socket.socket()", "import _socket, socket\nsocket.socket()",
                 "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9', timeout=1)"):
        r = run(mechanism, code)
        assert not r.success and BLOCKED in r.error, (code, r.error)
    r = run(mechanism, "import subprocess, shutil\nprint(subprocess.list2cmdline(['a', 'b']))\nshutil.rmtree('x')")
    assert r.stdout == "a b\n" and r.error == "PermissionError: shutil.rmtree is disabled in the sandbox"
    assert "halted" in run(mechanism, "import signal").error  # still blocked after subprocess needed it


def test_python_guards_remain_as_a_second_layer(mechanism):
    code = ("import os, subprocess\n"
            "for f in (lambda: os.fork(), lambda: subprocess.run(['true']), lambda: os.system('true')):\n"
            "    try:\n        f()\n        print('ran')\n    except Exception as e:\n        print('blocked')\n")
    r = run(mechanism, code)
    assert r.success and r.stdout.split() == ["blocked"] * 3
    assert run(mechanism, "import os\nos.kill(1, 9)").error == "PermissionError: os.kill is disabled in the sandbox"
    r = run(mechanism, "import socket\nsocket.create_connection(('127.0.0.1', 9))")
    assert BLOCKED in r.error  # not "connection refused": it never reached the kernel
    r = run(mechanism, "open('/tmp/nanochat_guard_test', 'w')")
    assert "PermissionError" in r.error and "outside the sandbox directory" in r.error


def test_network_namespace_has_only_loopback(mechanism):
    if mechanism == "fallback" and not network_namespace_available():
        pytest.skip("unshare -n does not work here")
    r = run(mechanism, "print(open('/proc/net/dev').read())")
    interfaces = [line.split(":")[0].strip() for line in r.stdout.splitlines()[2:] if line.strip()]
    assert interfaces == ["lo"]


def test_bubblewrap_started_by_an_unprivileged_caller():
    """CI runs as root, where bwrap runs privileged; here the other mode: a caller that is not root
    (nobody, through setpriv, with Debian's own Python, which nobody can read) gets a user namespace."""
    bubblewrap_or_skip()
    python = shutil.which("python3", path="/usr/bin")
    if os.geteuid() != 0 or not privilege_drop_available() or not python:
        pytest.skip("needs root, setpriv and /usr/bin/python3 to start a caller as nobody")
    package = pathlib.Path(REPO, "nanochat")
    if not all(d.stat().st_mode & 0o005 == 0o005 for d in [package, *package.parents]):  # o+rx all the way
        pytest.skip(f"nobody cannot read the checkout at {REPO}")
    caller = ("import sys\nsys.path.insert(0, sys.argv[1])\nfrom nanochat.execution import execute_code, isolation\n"
              "r = execute_code('import os\\nprint(os.getuid(), os.listdir(\"/\"))')\n"
              "print(isolation(), r.stdout, r.error)")
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", python, "-c", caller, REPO],
                       capture_output=True, text=True, timeout=60, cwd="/")
    assert p.stdout.startswith("bubblewrap 65534 "), p.stdout + p.stderr
    listed = ast.literal_eval(p.stdout[len("bubblewrap 65534 "):p.stdout.index("]") + 1])
    assert set(listed) <= {"sandbox", "tmp", "dev", "proc", "usr", "lib", "lib64", "lib32", "libx32"}


def test_fallback_is_reported_once_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(execution, "_bubblewrap_problem", lambda: "bwrap not found (install bubblewrap)")
    monkeypatch.setattr(execution, "_fallback_reported", False)
    assert isolation() == "fallback: bwrap not found (install bubblewrap)"
    assert execute_code("print(1)").success and execute_code("print(2)").success
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "fallback: bwrap not found" in lines[0]
    with pytest.raises(RuntimeError, match="bwrap not found"):
        execute_code("print(3)", bubblewrap=True)


# ----------------------------------------------------------------------------- the escape table
# Each row: fn(attempt) runs one escape attempt and asserts it failed; and why the fallback cannot
# hold it (None: it must hold there too). `attempt` knows the mechanism, the planted secrets and
# can run the code from a separate caller process whose environment and command line hold secrets.

ESCAPES = {}

# The fallback, as root with setpriv: nobody with CAP_DAC_READ_SEARCH, no mount namespace.
READS_EVERYTHING = "fallback: the code keeps CAP_DAC_READ_SEARCH (or is the caller's own user): it reads any file"
SHARED_TMP = "fallback: no mount namespace; /tmp is world-writable and _io.FileIO is not guarded"
WORLD_READABLE_PROC = "fallback: the host's /proc; every process's command line is world-readable"
AS_CALLER = None if privilege_drop_available() else "fallback without root + setpriv: the code runs as the caller's user"
NO_NETNS = None if network_namespace_available() else "fallback: unshare -n does not work here"
# As root with setpriv and unshare (CI) the fallback's outcome is known, so its xfails are strict; as
# another user it depends on the machine (what that user owns, Yama's ptrace scope, what /home holds).
FALLBACK_KNOWN = os.geteuid() == 0 and privilege_drop_available() and network_namespace_available()


def escape(name, fallback_limit=None):
    def register(fn):
        ESCAPES[name] = (fn, fallback_limit)
        return fn
    return register


class Attempt:
    def __init__(self, mechanism, secret_file, home_secret_file, tmp_path):
        self.mechanism, self.tmp_path = mechanism, tmp_path
        self.secret_file, self.home_secret_file = secret_file, home_secret_file
        self.secret = open(secret_file).read()
        self.home_secret = open(home_secret_file).read()

    def run(self, code, **kw):
        return run(self.mechanism, code, **kw)

    def run_from_caller(self, code):
        """Run the code from a separate caller process (CALLER_PID in the code is its pid) whose
        environment and command line hold secrets. -> (caller's exit status, result or None, secrets)"""
        env_secret, argv_secret = secrets.token_hex(16), secrets.token_hex(16)
        caller = ("import json, os, sys\nsys.path.insert(0, sys.argv[1])\n"
                  "from nanochat.execution import execute_code\n"
                  "r = execute_code(sys.stdin.read().replace('CALLER_PID', str(os.getpid())), "
                  "bubblewrap=sys.argv[2] == 'bubblewrap')\nprint(json.dumps(r.__dict__))\n")
        p = subprocess.run([sys.executable, "-c", caller, REPO, self.mechanism, f"--token={argv_secret}"],
                           input=code, capture_output=True, text=True, timeout=60,
                           env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NANOCHAT_TEST_SECRET": env_secret})
        result = ExecutionResult(**json.loads(p.stdout)) if p.returncode == 0 else None
        return p.returncode, result, (env_secret, argv_secret)


@escape("read a root-only file", READS_EVERYTHING)
def _(attempt):
    r = attempt.run(UNGUARD + f"fd = libc.open({attempt.secret_file.encode()!r}, 0)\n"  # the raw syscall, then open()
                              f"print(fd, os.read(fd, 100) if fd >= 0 else ctypes.get_errno())\n"
                              f"print(open({attempt.secret_file!r}).read())")
    assert attempt.secret not in r.stdout + r.stderr
    assert not r.success and ("FileNotFoundError" in r.error or "PermissionError" in r.error), r.error


@escape("read a file under the user's home", READS_EVERYTHING)
def _(attempt):
    r = attempt.run(f"print(open({attempt.home_secret_file!r}).read())")
    assert attempt.home_secret not in r.stdout + r.stderr
    assert not r.success and ("FileNotFoundError" in r.error or "PermissionError" in r.error), r.error


@escape("read the project and the venv", READS_EVERYTHING)
def _(attempt):
    readme, venv = os.path.join(REPO, "README.md"), sys.prefix
    r = attempt.run(f"import os\nprint(open({readme!r}).read()[:100])\nprint(os.listdir({venv!r}))")
    assert open(readme).read(100) not in r.stdout and not r.success, r.error


@escape("list /home and /root", READS_EVERYTHING)
def _(attempt):
    r = attempt.run("import os\nfor d in ('/home', '/root'):\n    try:\n        print(d, os.listdir(d))\n"
                    "    except OSError as e:\n        print(d, type(e).__name__)\n")
    assert r.success, r.error
    runtime = os.path.realpath(sys.executable).split(os.sep)  # the runtime's own path may run through them
    for line in r.stdout.splitlines():
        d, listed = line.split(" ", 1)
        names = ast.literal_eval(listed) if listed.startswith("[") else []
        assert set(names) <= set(runtime), f"{d} shows {names}"
    assert os.path.basename(attempt.home_secret_file) not in r.stdout


def caller_proc_files(attempt, name):
    """From a caller whose environment and command line hold secrets: the code prints the caller's
    /proc/<pid>/<name> and every other one it can see. -> (what it printed, (env secret, argv secret))"""
    code = (f"import glob\nfor p in ['/proc/CALLER_PID/{name}', *glob.glob('/proc/[0-9]*/{name}')]:\n"
            "    try:\n        print(p, open(p, 'rb').read())\n    except OSError as e:\n        print(p, e)\n")
    status, r, planted = attempt.run_from_caller(code)
    assert status == 0 and r.success, r
    return r.stdout, planted


@escape("read the caller's environment", AS_CALLER)
def _(attempt):
    seen, (env_secret, _) = caller_proc_files(attempt, "environ")
    assert env_secret not in seen


@escape("read the caller's command line", WORLD_READABLE_PROC)
def _(attempt):
    seen, (_, argv_secret) = caller_proc_files(attempt, "cmdline")
    assert argv_secret not in seen


@escape("write outside the working dir", AS_CALLER)
def _(attempt):
    targets = [str(attempt.tmp_path / "escaped.txt"), os.path.join(os.path.dirname(os.__file__), "nanochat_escaped.py"),
               os.path.join(REPO, "nanochat_escaped.txt"), os.path.join(sys.prefix, "nanochat_escaped.txt")]
    try:
        r = attempt.run(UNGUARD + f"import _io\nfor t in {targets!r}:\n    try:\n"
                                  "        _io.FileIO(t, 'w').write(b'x')\n        print('wrote', t)\n"
                                  "    except OSError as e:\n        print(t, e)\n")
        assert r.success and "wrote" not in r.stdout, r.stdout
        assert not any(os.path.exists(t) for t in targets)
    finally:
        for t in targets:
            if os.path.exists(t):
                os.remove(t)


@escape("write into /tmp, then look in the host's /tmp", SHARED_TMP)
def _(attempt):
    target = f"/tmp/nanochat-escape-{secrets.token_hex(8)}"
    try:
        r = attempt.run(f"import _io\n_io.FileIO({target!r}, 'w').write(b'x')\nprint('wrote')")
        assert not os.path.exists(target), r
    finally:
        if os.path.exists(target):
            os.remove(target)


@escape("a symlink pointing out of the working dir", READS_EVERYTHING)
def _(attempt):
    target = f"/tmp/nanochat-escape-{secrets.token_hex(8)}"
    code = (UNGUARD + "import _io\n"
            f"libc.symlink({attempt.secret_file.encode()!r}, b'in')\nlibc.symlink({target.encode()!r}, b'out')\n"
            "for f in (lambda: print(_io.FileIO('in').read()), lambda: _io.FileIO('out', 'w').write(b'x')):\n"
            "    try:\n        f()\n    except OSError as e:\n        print(e)\n")
    try:
        r = attempt.run(code)
        assert r.success and attempt.secret not in r.stdout and not os.path.exists(target), r.stdout
    finally:
        if os.path.lexists(target):
            os.remove(target)


@escape("open a TCP connection to a server on 127.0.0.1", NO_NETNS)
def _(attempt):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        # socket.SocketType is the original class the guard did not replace: this reaches the kernel
        r = attempt.run(f"import socket\ns = socket.SocketType(socket.AF_INET, socket.SOCK_STREAM)\n"
                        f"s.settimeout(2)\ns.connect(('127.0.0.1', {port}))\nprint('connected')")
        assert not r.success and "connected" not in r.stdout
        assert "unreachable" in r.error or "refused" in r.error, r.error
        server.settimeout(0.2)
        with pytest.raises(socket.timeout):
            server.accept()


@escape("os.kill the caller", AS_CALLER)
def _(attempt):
    code = UNGUARD + "print(libc.kill(CALLER_PID, 9), ctypes.get_errno())"
    status, r, _ = attempt.run_from_caller(code)
    assert status == 0 and r is not None  # the caller lived to print the result
    assert r.stdout.split()[0] == "-1", r.stdout  # ESRCH (not in the PID namespace) or EPERM


@escape("syscalls through ctypes: setuid(0), mount, chroot, ptrace the caller", AS_CALLER)
def _(attempt):
    code = (UNGUARD + "calls = [libc.setuid(0), libc.setgid(0), libc.mount(b'none', b'/tmp', b'tmpfs', 0, None),\n"
            "         libc.chroot(b'/'), libc.ptrace(0x4206, CALLER_PID, 0, 0)]\nprint(*calls)")  # 0x4206: SEIZE
    status, r, _ = attempt.run_from_caller(code)
    assert status == 0 and r.success, r
    assert r.stdout.split() == ["-1"] * 5


@escape("fork bomb")
def _(attempt):
    if attempt.mechanism == "fallback" and os.geteuid() == 0 and not privilege_drop_available():
        pytest.skip("fallback as root without setpriv: RLIMIT_NPROC does not bind root; only the timeout would")
    code = (UNGUARD + "print(os.readlink('/proc/self/ns/pid'), flush=True)\n"
            "while True:\n    pid = libc.fork()\n    if pid > 0:\n        print(pid, flush=True)\n")
    t0 = time.monotonic()
    r = attempt.run(code, timeout=2.0, max_processes=8)
    assert not r.success and time.monotonic() - t0 < 6
    pid_ns, *pids = r.stdout.split()
    assert len(pids) < 100  # RLIMIT_NPROC stopped it (a user with many processes forks none at all)
    if attempt.mechanism == "bubblewrap":  # the namespace is gone: no process of the host is in it
        left = [p for p in glob.glob("/proc/[0-9]*") if os.path.exists(p) and _pid_ns(p) == pid_ns]
    else:
        left = [p for p in pids if alive(p)]
    assert not left


def _pid_ns(proc_dir):
    try:
        return os.readlink(os.path.join(proc_dir, "ns", "pid"))
    except OSError:
        return None


@escape("memory bomb")
def _(attempt):
    for code in ["x = bytearray(1 << 33)", "a = []\nwhile True:\n    a.append(' ' * 10**6)"]:
        r = attempt.run(code, timeout=10.0, max_memory_bytes=128 * 1024 * 1024)
        assert r.memory_exceeded and not r.success and not r.timeout
        assert r.error == f"memory limit of {128 * 1024 * 1024} bytes exceeded"


@escape("infinite loop")
def _(attempt):
    t0 = time.monotonic()
    r = attempt.run("while True:\n    pass", timeout=1.0)
    assert r.timeout and not r.success and r.error == "timed out after 1.0 s"
    assert time.monotonic() - t0 < 4


@escape("100 MB to stdout")
def _(attempt):
    t0 = time.monotonic()
    r = attempt.run("import os\nfor _ in range(100):\n    os.write(1, b'x' * 10**6)", timeout=10.0)
    assert not r.success and not r.timeout and r.output_truncated and time.monotonic() - t0 < 5
    assert r.error.startswith("output limit exceeded") and len(r.stdout) <= execution.MAX_OUTPUT_BYTES + 100


def _escape_params():
    for name, (_, fallback_limit) in ESCAPES.items():
        yield pytest.param(name, "bubblewrap", id=f"{name} [bubblewrap]")
        marks = [pytest.mark.xfail(strict=FALLBACK_KNOWN, reason=fallback_limit)] if fallback_limit else []
        yield pytest.param(name, "fallback", marks=marks, id=f"{name} [fallback]")


@pytest.fixture
def planted_secrets(tmp_path):
    """A root-only (mode 600, in a mode 700 dir) secret file, and one in the caller's real home."""
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir(mode=0o700)
    secret_file = secret_dir / "netrc"
    secret_file.write_text(f"machine api.wandb.ai password {secrets.token_hex(16)}\n")
    secret_file.chmod(0o600)
    home_file = os.path.join(os.path.expanduser("~"), f".nanochat-sandbox-test-{secrets.token_hex(6)}")
    try:
        with open(home_file, "w") as f:
            f.write(secrets.token_hex(16))
        os.chmod(home_file, 0o600)
    except OSError as e:
        pytest.skip(f"cannot plant a secret in the home dir: {e}")
    try:
        yield str(secret_file), home_file
    finally:
        os.remove(home_file)


@pytest.mark.parametrize("name, mech", list(_escape_params()))
def test_escape_is_contained(name, mech, planted_secrets, tmp_path):
    if mech == "bubblewrap":
        bubblewrap_or_skip()
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    ESCAPES[name][0](Attempt(mech, *planted_secrets, work))
