"""The golden fixtures are intact: every file the fixture README lists is present with its recorded sha256.

A clone that stored them as LFS pointers, converted line endings or lost a file fails here, by name, instead of
in a parity test's arithmetic.
"""

import hashlib
import re


def _listed(readme: str) -> dict[str, str]:
    return dict(re.findall(r"^\| ([\w.]+) \| [\d,]+ \| ([0-9a-f]{64}) \|$", readme, flags=re.M))


def test_every_listed_fixture_has_its_recorded_hash(fixtures_dir):
    listed = _listed((fixtures_dir / "README.md").read_text())
    assert len(listed) >= 11, "the fixture README's file table was not found"
    for name, sha in sorted(listed.items()):
        path = fixtures_dir / name
        assert path.is_file(), f"golden fixture {path} is missing"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha, f"golden fixture {path} differs from its sha256"


def test_no_unlisted_fixture(fixtures_dir):
    listed = set(_listed((fixtures_dir / "README.md").read_text()))
    extra = {p.name for p in fixtures_dir.iterdir()} - listed - {"README.md", "PROVENANCE.md"}
    assert not extra, f"files in {fixtures_dir} that the fixture README does not describe: {sorted(extra)}"
