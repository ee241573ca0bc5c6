"""
Tests of nanochat.execution: the sandbox for model-written Python.

    nice -n 19 python -m pytest tests/test_execution.py -q

Each test starts one short-lived child process; nothing touches the network (the network
test connects to a closed local port and must be stopped before it gets that far).
"""
import os
import time

import pytest

from nanochat.execution import (ExecutionResult, execute_code, network_namespace_available,
                                privilege_drop_available)

BLOCKED = "network access is disabled in the sandbox"


def test_normal_code_returns_stdout():
    r = execute_code("import math\nprint(math.factorial(5))\nprint(sum(range(4)))")
    assert r == ExecutionResult(success=True, stdout="120\n6\n", stderr="", error=None)


def test_exception_is_reported():
    r = execute_code("print('before')\n1 / 0")
    assert not r.success and r.stdout == "before\n"
    assert r.error == "ZeroDivisionError: division by zero" and "Traceback" in r.stderr


def test_infinite_loop_times_out():
    t0 = time.monotonic()
    r = execute_code("while True:\n    pass", timeout=1.0)
    assert r.timeout and not r.success and "timed out" in r.error
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("code", ["x = bytearray(1 << 33)", "a = []\nwhile True:\n    a.append(' ' * 10**6)"])
def test_memory_bomb_is_stopped(code):
    r = execute_code(code, timeout=10.0, max_memory_bytes=128 * 1024 * 1024)
    assert r.memory_exceeded and not r.success and not r.timeout


def test_fork_and_subprocess_are_removed():
    code = ("import os, subprocess\n"
            "for f in (lambda: os.fork(), lambda: subprocess.run(['true']), lambda: os.system('true')):\n"
            "    try:\n        f()\n        print('ran')\n    except Exception as e:\n        print('blocked')\n")
    r = execute_code("import os\nwhile True:\n    os.fork()", timeout=2.0)
    assert not r.success and not r.timeout and "TypeError" in r.error
    r = execute_code(code)
    assert r.success and r.stdout.split() == ["blocked"] * 3


def alive(pid):
    """pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not privilege_drop_available(), reason="needs root and setpriv (the code runs as nobody)")
def test_fork_bomb_bypassing_the_guard_is_contained():
    # dig out the real fork through ctypes: RLIMIT_NPROC (enforced for nobody) must stop it
    code = ("import sys, time\nfor m in ('ctypes', '_ctypes'):\n    del sys.modules[m]\nimport ctypes\n"
            "libc = ctypes.CDLL(None)\npids = []\nwhile len(pids) < 1000:\n    pid = libc.fork()\n"
            "    if pid == 0:\n        time.sleep(30)\n        libc._exit(0)\n"
            "    if pid < 0:\n        break\n    pids.append(pid)\nprint(*pids)\n")
    r = execute_code(code, timeout=5.0, max_processes=8)
    assert r.success, r.stderr
    pids = [int(p) for p in r.stdout.split()]
    assert 0 < len(pids) < 8  # the sandbox itself counts as one
    for _ in range(100):  # the sleeping children die with the process group
        if not any(alive(p) for p in pids):
            break
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)


def test_network_is_blocked():
    code = "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9/', timeout=2)"
    r = execute_code(code)
    assert not r.success and BLOCKED in r.error  # not "connection refused": it never connected
    r = execute_code("import socket\nsocket.create_connection(('127.0.0.1', 9))")
    assert BLOCKED in r.error


@pytest.mark.skipif(not network_namespace_available(), reason="unshare -n does not work here")
def test_network_namespace_has_no_interfaces():
    # below the Python guard: the original socket class reaches the kernel, which has no route
    r = execute_code("import socket\ns = socket.SocketType(socket.AF_INET, socket.SOCK_STREAM)\n"
                     "s.connect(('127.0.0.1', 9))")
    assert "Network is unreachable" in r.error
    r = execute_code("print(open('/proc/net/dev').read())")
    interfaces = [line.split(":")[0].strip() for line in r.stdout.splitlines()[2:] if line.strip()]
    assert interfaces == ["lo"]


def test_writes_stay_inside_the_temp_dir(tmp_path):
    outside = "/tmp/outside_file_nanochat_test"
    if os.path.exists(outside):
        os.remove(outside)
    r = execute_code(f"open({outside!r}, 'w').write('x')")
    assert not r.success and "PermissionError" in r.error and not os.path.exists(outside)
    r = execute_code("open('../x', 'w').write('x')")
    assert not r.success and "PermissionError" in r.error
    r = execute_code(f"import os\nfd = os.open({outside!r}, os.O_WRONLY | os.O_CREAT)")
    assert not r.success and "PermissionError" in r.error and not os.path.exists(outside)
    r = execute_code("import os\nopen('inside.txt', 'w').write('hello')\n"
                     "print(open('inside.txt').read())\nprint(os.getcwd())")
    assert r.success, r.stderr
    text, workdir = r.stdout.split()
    assert text == "hello" and os.path.basename(workdir).startswith("nanochat-exec-")
    assert not os.path.exists(workdir)  # removed afterwards


@pytest.mark.skipif(not privilege_drop_available(), reason="needs root and setpriv (the code runs as nobody)")
def test_runs_as_nobody_and_cannot_write_root_files(tmp_path):
    target = tmp_path / "owned_by_root.txt"
    target.write_text("keep")
    # _io.FileIO is not guarded: past the Python layer, the kernel still refuses
    code = f"import os, _io\nprint(os.getuid())\n_io.FileIO({str(target)!r}, 'w')"
    r = execute_code(code)
    assert r.stdout.split()[0] == "65534"
    assert not r.success and "Permission denied" in r.error
    assert target.read_text() == "keep"


def test_output_is_capped():
    r = execute_code("while True:\n    print('x' * 100000)", timeout=5.0)
    assert not r.success and not r.timeout
    assert len(r.stdout) <= (1 << 20) + 100
