"""A regular (non-editable) install is what users and CI get: twistd must find the dropin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_twistd_lists_bwraft_after_a_regular_install(tmp_path):
    """``twisted/plugins/bwraft_dropin.py`` and the ``bwraft_plugins`` package land in
    site-packages, so ``twistd --help`` lists ``bwraft`` from any working directory."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(REPO)],
                   check=True, capture_output=True, cwd=tmp_path)
    assert (target / "twisted" / "plugins" / "bwraft_dropin.py").is_file()
    assert (target / "bwraft_plugins" / "kv.py").is_file()
    assert not (target / "plugins").exists()  # no generic top-level name taken
    # Every package of the checkout is installed (a package missing from setup.cfg is not).
    for init in sorted(REPO.joinpath("bwcore").rglob("__init__.py")):
        assert (target / init.relative_to(REPO)).is_file(), init
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                          "--help"], capture_output=True, text=True, cwd=tmp_path, env=env,
                         check=True).stdout
    assert any(line.split()[:1] == ["bwraft"] for line in out.splitlines())
