"""Run model-written Python in a sandboxed child process.

    result = execute_code("print(1 + 1)", timeout=5.0)
    result.success, result.stdout  # True, "2\\n"

Two mechanisms; `isolation()` says which one is in use (the README's "Sandbox" section has the detail):
- "bubblewrap", wherever `bwrap` can start a sandbox: the code sees a filesystem that holds only the
  Python runtime (read-only) and fresh tmpfs mounts as its working dir, home and /tmp; its own /proc,
  PID, network, IPC and UTS namespaces; an empty environment; uid 65534 (nobody), no capabilities.
- "fallback: <why not bubblewrap>": no filesystem isolation. Root callers run the code as nobody
  (setpriv; it keeps CAP_DAC_READ_SEARCH, so it can read every file) in an empty network namespace
  (`unshare -n`). Reported once, on stderr, by the first call that uses it.
Both: a separate session and process group SIGKILLed at the wall-clock timeout; RLIMIT_AS, CPU,
FSIZE and NPROC; Python-level guards (sockets, writes outside the working dir, os.fork/kill/system,
ctypes, ...) as a second layer only: code that digs for the originals gets past them.
"""
import os
import select
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache

MAX_OUTPUT_BYTES = 1 << 20  # default cap on each of stdout / stderr kept in the result
MAX_FILE_BYTES = 4 << 20  # RLIMIT_FSIZE: any file the code writes, its stdout and stderr included
TMPFS_BYTES = 64 << 20  # bubblewrap: the size of each of the working dir and /tmp (they live in RAM)
MEMORY_EXIT_CODE = 97  # the runner exits with this after a MemoryError
SANDBOX_UID = 65534  # nobody
SANDBOX_DIR = "/sandbox"  # bubblewrap: the working dir and home, as the code sees them

# The child's program: limit itself, become nobody if it starts as root, read the code from stdin, lock
# itself down, run the code.
_RUNNER = r'''
import builtins, io, os, resource, sys
# argv: mem cpu fsize nproc uid|"" workdir path... (no json: importing it costs as much as starting Python)
mem, cpu, fsize, nproc = (int(a) for a in sys.argv[1:5])
uid, workdir, extra_path = (int(sys.argv[5]) if sys.argv[5] else None), sys.argv[6], sys.argv[7:]
for lim, v in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize),
               (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(lim, (v, v))
if uid is not None:  # bubblewrap started as root left us CAP_SETUID/SETGID for this, and no more
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)  # from root to nobody: every capability is dropped
code = sys.stdin.read()
sys.stdin.close()
sys.stdin = open(os.devnull)
sys.path.extend(extra_path)  # site-packages, only when the caller asked for them (-S skipped them)
workdir = os.path.realpath(workdir)
os.chdir(workdir)

def _no_network(*args, **kwargs):
    raise PermissionError("network access is disabled in the sandbox")
def _no_socket_class(base):
    class _NoNetwork(base):
        def __init__(self, *args, **kwargs):
            _no_network()
    return _NoNetwork

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
import _io, posix
builtins.open = io.open = _io.open = guarded_open
os.open = posix.open = guarded_os_open

def _disabled(name):  # a call says what stopped it, where None would say "'NoneType' object is not callable"
    def disabled(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")
    return disabled
def _disable(mod, names):
    for name in names:
        if hasattr(mod, name):
            setattr(mod, name, _disabled(f"{mod.__name__}.{name}"))
_OS_NAMES = ("kill", "killpg", "system", "remove", "removedirs", "rmdir", "unlink",
             "rename", "renames", "replace", "truncate", "fchdir", "chdir", "chroot", "chmod", "fchmod",
             "lchmod", "chown", "fchown", "lchown", "setuid", "setgid", "seteuid", "setegid", "setsid",
             "setpgid", "fork", "forkpty", "vfork", "execv", "execve", "execvp", "execvpe", "execl", "execle",
             "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle",
             "spawnlp", "spawnlpe", "posix_spawn", "posix_spawnp", "popen", "link", "symlink", "mkfifo",
             "mknod", "plock", "sched_setaffinity", "setpriority", "nice")
_disable(os, _OS_NAMES)
_disable(posix, _OS_NAMES)

def _guard_socket(m):
    m.socket = sys.modules["_socket"].socket = _no_socket_class(m.socket)
    for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo", "gethostbyname"):
        setattr(m, name, _no_network)
def _guard__socket(m):
    if "socket" not in sys.modules:  # imported on its own: socket.py subclasses the real class, then its guard runs
        import socket
# Modules guarded when the code imports them, not before: importing them up front would more than
# double the start-up time of every call (~13 ms of ~20).
_GUARDS = {"_socket": _guard__socket, "socket": _guard_socket,
           "shutil": lambda m: _disable(m, ("rmtree", "move", "chown", "copytree")),
           "subprocess": lambda m: _disable(m, ("Popen", "run", "call", "check_call", "check_output", "getoutput",
                                                "getstatusoutput"))}
class _GuardedLoader:
    def __init__(self, loader, guard):
        self.loader, self.guard = loader, guard
    def create_module(self, spec):
        return self.loader.create_module(spec)
    def exec_module(self, module):
        blocked = [name for name in _BLOCKED if name in sys.modules and sys.modules[name] is None]
        for name in blocked:  # subprocess needs signal and _posixsubprocess to import (not to run: disabled)
            del sys.modules[name]
        try:
            self.loader.exec_module(module)
        finally:
            sys.modules.update(dict.fromkeys(blocked))
        self.guard(module)
class _GuardOnImport:
    def find_spec(self, name, path=None, target=None):
        if name not in _GUARDS:
            return None
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if finder is not self and hasattr(finder, "find_spec") else None
            if spec is not None:
                spec.loader = _GuardedLoader(spec.loader, _GUARDS[name])
                return spec
        return None
sys.meta_path.insert(0, _GuardOnImport())
_BLOCKED = ("ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "pty", "resource", "psutil", "signal",
            "_signal", "tkinter", "joblib", "ipdb")
sys.modules.update(dict.fromkeys(_BLOCKED))
for name in ("exit", "quit", "help"):
    setattr(builtins, name, _disabled(name))

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
    status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    os._exit(status if 0 <= status < 128 else 1)  # above 127 bwrap means "killed by signal status - 128"
except BaseException as e:
    # the interpreter's own C printer: the same text as traceback.print_exc(), without importing
    # traceback (10 ms, as much again as the rest of a failing call)
    sys.__excepthook__(type(e), e, e.__traceback__)
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
    output_truncated: bool = False  # stdout or stderr was longer than the result keeps


# ----------------------------------------------------------------------------- the fallback

def _works(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """Fallback: can this process start a child in a fresh network namespace (`unshare -n`)?"""
    return shutil.which("unshare") is not None and _works(["unshare", "-n", "true"])


# setpriv switches to nobody before exec. The child keeps one capability, DAC_READ_SEARCH
# (read any file, never write), so Python can still import its standard library wherever it
# is installed (e.g. under /root, mode 700): the fallback does not isolate reading.
_DROP_PRIVILEGES = ["setpriv", f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups",
                    "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", "--"]


@lru_cache(maxsize=1)
def privilege_drop_available() -> bool:
    """Fallback: are we root with a working `setpriv`, so the code can run as nobody?"""
    return (os.geteuid() == 0 and shutil.which("setpriv") is not None
            and _works([*_DROP_PRIVILEGES, sys.executable, "-I", "-c", "import json"]))


def _fallback_command():
    cmd = [sys.executable]
    if privilege_drop_available():
        cmd = [*_DROP_PRIVILEGES, *cmd]
    if network_namespace_available():
        cmd = ["unshare", "-n", *cmd]
    return cmd  # unshare and setpriv exec what follows: one pid, one process group


# ----------------------------------------------------------------------------- bubblewrap

# Where the dynamic loader looks by default (libc, libm, libffi, libssl, the locale data); bound
# read-only, or recreated as the symlinks they are (/lib -> usr/lib on merged-/usr systems).
_SYSTEM_LIB_DIRS = ("/lib", "/lib32", "/lib64", "/libx32", "/usr/lib", "/usr/lib32", "/usr/lib64", "/usr/libx32")


def _site_packages():
    return [p for p in site.getsitepackages() if os.path.isdir(p)]


def _ancestors(path):
    parent = os.path.dirname(path)
    return [] if parent == "/" else [*_ancestors(parent), parent]


@lru_cache(maxsize=2)
def _runtime_binds(packages: bool) -> tuple:
    """bwrap options that show the sandbox the Python runtime at its own paths, read-only, and nothing
    else of the host: the interpreter, the dirs it imports from and links against (asked of the
    interpreter itself), the system library dirs, and the caller's site-packages when asked."""
    exe = os.path.realpath(sys.executable)
    ask = "import sys, sysconfig; print(*sys.path, sysconfig.get_config_var('LIBDIR') or '', sep='\\n')"
    own = subprocess.run([exe, "-I", "-S", "-c", ask], capture_output=True, text=True, timeout=30).stdout
    opts, paths = [], {exe, *(os.path.realpath(p) for p in own.splitlines() if p)}
    for d in _SYSTEM_LIB_DIRS:
        if os.path.islink(d):
            opts += ["--symlink", os.readlink(d), d]
        paths.add(os.path.realpath(d))
    paths.update(os.path.realpath(p) for p in (_site_packages() if packages else []))
    paths = sorted(p for p in paths if os.path.exists(p))
    paths = [p for i, p in enumerate(paths) if not any(p.startswith(q + os.sep) for q in paths[:i])]
    # bwrap creates the dirs above a mount point with mode 700 (root's, as root): open them to nobody
    for d in sorted({a for p in paths for a in _ancestors(p)}):
        opts += ["--perms", "0755", "--dir", d]
    for p in paths:
        opts += ["--ro-bind", p, p]
    return tuple(opts)


def _bwrap_command(packages: bool):
    # --as-pid-1: the runner is the namespace's init, so bwrap waits for it, and the kernel kills every
    # other process in the namespace before it counts as exited: nothing outlives the call. (No
    # --new-session: _run starts bwrap in a session of its own already, with no terminal.)
    cmd = [shutil.which("bwrap") or "bwrap", "--die-with-parent", "--as-pid-1", "--unshare-pid",
           "--unshare-net", "--unshare-ipc", "--unshare-uts", "--hostname", "sandbox", "--unshare-cgroup-try"]
    if os.geteuid() == 0:
        # bwrap as root: a user namespace would map the sandbox's uid onto host root (not bound by
        # RLIMIT_NPROC, owner of root's files), so none; the runner drops to nobody with these two
        # capabilities before it reads the code, and bwrap's NoNewPrivs keeps it from ever gaining any
        cmd += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        cmd += ["--unshare-user", "--disable-userns", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
    # the tmpfs mounts first: a runtime under /tmp (a venv made there) is then bound on top of the
    # fresh /tmp instead of being hidden under it
    for mount in ("/tmp", SANDBOX_DIR):
        cmd += ["--size", str(TMPFS_BYTES), "--perms", "1777", "--tmpfs", mount]
    cmd += [*_runtime_binds(packages), "--proc", "/proc", "--dev", "/dev"]
    return cmd + ["--chdir", SANDBOX_DIR, "--clearenv", "--setenv", "HOME", SANDBOX_DIR,
                  "--setenv", "LANG", "C.UTF-8", "--", os.path.realpath(sys.executable)]


@lru_cache(maxsize=1)
def _bubblewrap_problem() -> str | None:
    """None when bubblewrap starts a sandbox here (tried once, for real), else why not, in a few words."""
    if not sys.platform.startswith("linux"):
        return f"bubblewrap needs Linux (this is {sys.platform})"
    if shutil.which("bwrap") is None:
        return "bwrap not found (install bubblewrap, e.g. apt install bubblewrap)"
    try:
        returncode, _, out, err = _run_bubblewrap("import os\nprint(os.getuid())", _limits(30, 256 << 20, 16, False),
                                                  30.0, packages=False)
    except (OSError, subprocess.SubprocessError) as e:
        return f"bwrap does not start: {e}"
    with out, err:
        stdout, stderr = _read_capped(out, 4096)[0].strip(), _read_capped(err, 4096)[0].strip()
    if returncode != 0:
        return f"bwrap cannot start a sandbox here ({(stderr.splitlines() or [f'exit status {returncode}'])[-1]})"
    return None if stdout == str(SANDBOX_UID) else f"the sandbox ran as uid {stdout}, not {SANDBOX_UID}"


def isolation() -> str:
    """Which sandbox execute_code uses by default: "bubblewrap", or "fallback: <why not bubblewrap>"."""
    problem = _bubblewrap_problem()
    return "bubblewrap" if problem is None else f"fallback: {problem}"


_fallback_reported = False


def _report_fallback_once():
    global _fallback_reported
    if not _fallback_reported:
        _fallback_reported = True
        print(f"nanochat.execution: sandbox is the {isolation()}; model code can read any file on this "
              "machine (see README, Sandbox)", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- running the child

def _exited_within(proc, timeout):
    """Wait until proc exits or timeout seconds pass, without reaping it (so its process group stays
    valid for killpg). A pidfd wakes up the moment it exits; Popen.wait(timeout) polls with sleeps
    that grow to 50 ms, a third of a short call."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux >= 5.3
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poller = select.poll()  # not select.select: a busy server may hold fds above FD_SETSIZE
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(max(0.0, timeout) * 1000))
    finally:
        os.close(fd)


def _exited_or_stopped(proc, timeout, stop):
    """Wait until proc exits (True), or timeout seconds pass or `stop` is set (False); `stop` is
    looked at every 50 ms."""
    if stop is None:
        return _exited_within(proc, timeout)
    deadline = time.monotonic() + timeout
    while not stop.is_set():
        left = deadline - time.monotonic()
        if _exited_within(proc, min(max(left, 0.0), 0.05)):
            return True
        if left <= 0.05:
            return False
    return False


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _stop(proc, bwrap):
    """SIGKILL the code at its timeout. Under bwrap, its pid 1 first (bwrap's child): bwrap reaps it
    and exits by itself, where killing bwrap first would leave it to the host's init to reap."""
    children = _children(proc.pid) if bwrap else []
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended meanwhile
            pass
    if not children or not _exited_within(proc, 1.0):
        _kill_group(proc.pid)


def _kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_until_gone(pgid, wait_s=2.0):
    """Wait (bounded) until no process of the group is left."""
    deadline = time.monotonic() + wait_s
    try:
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)
            time.sleep(0.005)
    except (ProcessLookupError, PermissionError):
        pass


def _read_capped(f, cap):
    """-> (text of at most cap bytes, whether there was more, bytes written in all)"""
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    text = f.read(cap).decode("utf-8", errors="replace")
    return text + ("\n[output truncated]" if size > cap else ""), size > cap, size


def _run(cmd, code, timeout, cwd, env, bwrap, stop=None):
    """Start cmd (the runner behind its sandbox), feed it the code, wait at most timeout seconds
    (less if `stop` is set).
    -> (exit status, timed out, stdout file, stderr file); the caller closes the files."""
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=cwd, env=env,
                            start_new_session=True, close_fds=True)
    try:
        proc.stdin.write(code.encode("utf-8", errors="replace"))
        proc.stdin.close()
    except BrokenPipeError:  # the child died before reading (e.g. startup hit a limit)
        pass
    timed_out = not _exited_or_stopped(proc, timeout, stop)
    if timed_out:
        _stop(proc, bwrap)
    _kill_group(proc.pid)  # leftovers the code started in its group (our child is not reaped: still ours)
    returncode = proc.wait()
    _wait_until_gone(proc.pid)
    return returncode, timed_out, out, err


def _runner(cfg):
    args = [cfg["mem"], cfg["cpu"], cfg["fsize"], cfg["nproc"], "" if cfg["uid"] is None else cfg["uid"], cfg["workdir"]]
    return ["-I", "-S", "-c", _RUNNER, *map(str, args), *cfg["path"]]


def _limits(timeout, max_memory_bytes, max_processes, packages):
    """The runner's configuration: its rlimits and extra import paths."""
    return dict(mem=int(max_memory_bytes), cpu=int(timeout) + 1, fsize=MAX_FILE_BYTES, nproc=int(max_processes),
                path=_site_packages() if packages else [])


def _run_bubblewrap(code, cfg, timeout, packages, stop=None):
    cfg = dict(cfg, workdir=SANDBOX_DIR, uid=SANDBOX_UID if os.geteuid() == 0 else None)
    # bwrap's own environment stays minimal too: in a user namespace the code can read /proc/1/environ
    returncode, timed_out, out, err = _run([*_bwrap_command(packages), *_runner(cfg)], code, timeout, cwd="/",
                                           env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, bwrap=True, stop=stop)
    if returncode > 128:  # bwrap reports a child killed by signal N as exit status 128 + N
        returncode = 128 - returncode
    return returncode, timed_out, out, err


def _run_fallback(code, cfg, timeout, packages, stop=None):
    workdir = tempfile.mkdtemp(prefix="nanochat-exec-")
    try:
        if privilege_drop_available():
            os.chown(workdir, SANDBOX_UID, SANDBOX_UID)
        cfg = dict(cfg, workdir=workdir, uid=None)
        return _run([*_fallback_command(), *_runner(cfg)], code, timeout, cwd=workdir,
                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir}, bwrap=False, stop=stop)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _use_bubblewrap(asked: bool | None) -> bool:
    problem = _bubblewrap_problem() if asked is not False else None
    if asked and problem:
        raise RuntimeError(f"bubblewrap was asked for but cannot be used: {problem}")
    if asked is None and problem:
        _report_fallback_once()
    return asked is not False and problem is None


def _why_failed(returncode, timed_out, output_limit_hit, stderr, timeout, max_memory_bytes):
    """One line for the result's error, or None when the code ran to the end within every limit."""
    if timed_out:
        return f"timed out after {timeout} s"
    if returncode == MEMORY_EXIT_CODE:
        return f"memory limit of {max_memory_bytes} bytes exceeded"
    if output_limit_hit:
        return f"output limit exceeded: the code wrote {MAX_FILE_BYTES} bytes to stdout or stderr"
    if returncode < 0:
        return f"killed by signal {signal.Signals(-returncode).name}"
    if returncode != 0:
        lines = stderr.strip().splitlines()
        return lines[-1] if lines else f"exit status {returncode}"
    return None


def execute_code(code: str, timeout: float = 5.0, max_memory_bytes: int = 256 * 1024 * 1024,
                 max_processes: int = 16, max_output_bytes: int = MAX_OUTPUT_BYTES, packages: bool = False,
                 bubblewrap: bool | None = None, stop=None) -> ExecutionResult:
    """Run `code` (a Python program) in the sandbox and return its stdout, stderr (each cut at
    max_output_bytes) and what went wrong, if anything. The code imports the standard library only,
    unless packages=True (the caller's site-packages, read-only). bubblewrap: None uses it where it
    works (see isolation()), False forces the fallback, True refuses to run without it. stop: a
    threading.Event; setting it kills the code early (error "stopped": a cancelled chat reply)."""
    run = _run_bubblewrap if _use_bubblewrap(bubblewrap) else _run_fallback
    cfg = _limits(timeout, max_memory_bytes, max_processes, packages)
    returncode, timed_out, out, err = run(code, cfg, timeout, packages, stop)
    with out, err:
        stdout, out_cut, out_size = _read_capped(out, max_output_bytes)
        stderr, err_cut, err_size = _read_capped(err, max_output_bytes)
    timed_out = timed_out or returncode == -signal.SIGXCPU  # RLIMIT_CPU, the backstop
    output_limit_hit = returncode == -signal.SIGXFSZ or max(out_size, err_size) >= MAX_FILE_BYTES
    error = _why_failed(returncode, timed_out, output_limit_hit, stderr, timeout, max_memory_bytes)
    if timed_out and stop is not None and stop.is_set():
        error = "stopped"
    return ExecutionResult(success=error is None, stdout=stdout, stderr=stderr, error=error, timeout=timed_out,
                           memory_exceeded=returncode == MEMORY_EXIT_CODE, output_truncated=out_cut or err_cut)
