"""Is this Python on this platform one the locks cover? `make install` asks before it builds
anything; the answer is one line, and exit status 1 when the locks do not fit.

The locks are resolved for CPython 3.11 and hashed for the files of their pinned versions
(requirements/lock.py); the CPU lock's torch is PyTorch's CPU build for CPython 3.11 on Linux
x86_64, so that is what the locks cover. Elsewhere, install without a lock (unpinned):
`pip install -e ".[eval]"` with the torch build of your platform (docs/development.md).
"""

import platform
import sys

COVERED = "CPython 3.11 on Linux x86_64"
here = (f"{platform.python_implementation()} {platform.python_version()} on "
        f"{platform.system()} {platform.machine()}")
ok = (platform.python_implementation() == "CPython" and sys.version_info[:2] == (3, 11)
      and platform.system() == "Linux" and platform.machine() == "x86_64")
if not ok:
    sys.exit(f"make install: the locks cover {COVERED}; this is {here}. Use a CPython 3.11 "
             "(make install PYTHON=python3.11), or install unpinned: pip install -e '.[eval]' "
             "(docs/development.md)")
