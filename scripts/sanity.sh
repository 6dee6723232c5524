#!/usr/bin/env bash
# Run `ansible-test sanity` on the collection, offline, with no ignore entries.
#
# ansible-test wants the collection at .../ansible_collections/cicc/cloud, so the repository's files
# (tracked, plus untracked ones git does not ignore) are copied afresh into
# .build/ansible_collections/cicc/cloud, beside links to the collections cicc.cloud depends on,
# taken from the `ansible` package in .venv (Galaxy is not reachable). Extra arguments go to
# ansible-test, e.g. `scripts/sanity.sh --test pep8` or `scripts/sanity.sh -v`.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export PATH=$root/.venv/bin:$PATH
python_version=3.11
build_root=$root/.build/ansible_collections
dest=$build_root/cicc/cloud
log() { printf '==> %s\n' "$*"; }

command -v ansible-test >/dev/null || { echo "ansible-test is not in $root/.venv: run 'make setup' first" >&2; exit 1; }

# Without shellcheck, ansible-test silently skips its shellcheck test on scripts/*.sh.
if ! command -v shellcheck >/dev/null; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    log "Installing shellcheck (for the shellcheck sanity test)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck >/dev/null
  else
    echo "shellcheck is missing: install it (apt-get install shellcheck) so the shellcheck sanity test runs" >&2
    exit 1
  fi
fi

# The changelog, with the documentation tools in .venv-docs (scripts/setup.sh): the fragments and
# changelogs/changelog.yaml pass antsibull-changelog's lint, and CHANGELOG.rst is what
# `antsibull-changelog generate` makes of them. It is generated in a scratch copy of changelogs/ and
# galaxy.yml, so the work tree is left as it is.
changelog_tool=$root/.venv-docs/bin/antsibull-changelog
if [ -x "$changelog_tool" ]; then
  log "Checking the changelog (antsibull-changelog lint, then CHANGELOG.rst against generate)"
  "$changelog_tool" lint || { echo "antsibull-changelog lint failed: fix the fragments named above" >&2; exit 1; }
  "$changelog_tool" lint-changelog-yaml changelogs/changelog.yaml ||
    { echo "changelogs/changelog.yaml is not in antsibull-changelog's format: fix it" >&2; exit 1; }
  changelog_tmp=$(mktemp -d)
  trap 'rm -rf "$changelog_tmp"' EXIT
  cp -R changelogs galaxy.yml "$changelog_tmp/"
  (cd "$changelog_tmp" && "$changelog_tool" generate) ||
    { echo "antsibull-changelog generate failed" >&2; exit 1; }
  if ! diff -u CHANGELOG.rst "$changelog_tmp/CHANGELOG.rst"; then
    echo "CHANGELOG.rst is not what changelogs/ makes (the differences are above):" \
      "run '.venv-docs/bin/antsibull-changelog generate' and keep its CHANGELOG.rst" >&2
    exit 1
  fi
fi

# ansible-test builds each sanity test's virtualenv by running a get-pip.py it downloads from a host
# that is not reachable here. This stand-in installs pip from the wheel Python ships (ensurepip), then
# lets that pip install what ansible-test asked for from the package index. ensurepip points
# PIP_CONFIG_FILE at /dev/null, which would hide the machine's pip configuration (index, wheels,
# certificates), so it is dropped before pip runs. get-pip.py's own --no-setuptools/--no-wheel are
# not pip options: they are dropped too.
pip_version=$(python - "$python_version" <<'PY'
import sys

from ansible_test._internal.host_configs import NativePythonConfig
from ansible_test._internal.python_requirements import get_venv_packages

print(get_venv_packages(NativePythonConfig(version=sys.argv[1]))["pip"])
PY
)
get_pip=$HOME/.ansible/test/cache/get_pip_${pip_version//./_}.py
if [ ! -e "$get_pip" ]; then
  log "Writing the offline pip bootstrap stand-in $get_pip"
  mkdir -p "$(dirname "$get_pip")"
  cat >"$get_pip" <<'PY'
"""Offline stand-in for get-pip.py, written by cicc.cloud scripts/sanity.sh: pip from ensurepip, then pip install."""
import ensurepip
import os
import subprocess
import sys

ensurepip.bootstrap()
os.environ.pop("PIP_CONFIG_FILE", None)
args = [arg for arg in sys.argv[1:] if arg not in ("--no-setuptools", "--no-wheel")]
sys.exit(subprocess.call([sys.executable, "-m", "pip", "install", *args]))
PY
fi

log "Copying the collection to $dest"
rm -rf "$root/.build/ansible_collections"
mkdir -p "$dest"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # A file deleted from the work tree but still in the index is listed too: skip it (and one that
  # vanishes between the listing and the copy, such as an editor's temporary file).
  git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' file; do
      if [ -e "$file" ] || [ -L "$file" ]; then printf '%s\0' "$file"; fi
    done |
    tar --null --no-recursion --ignore-failed-read -T - -cf - | tar -C "$dest" -xf -
else
  tar --exclude=./.git --exclude=./.venv --exclude=./.venv-localstack --exclude=./.venv-docs --exclude=./.collections \
    --exclude=./.build --exclude=./tests/output -cf - . | tar -C "$dest" -xf -
fi
# ansible-test lists a collection's files with git when it finds a .git directory up the tree, and
# .build/ is ignored by this repository's git: give the copy its own (empty) repository, so that
# every file of the copy counts, with the same .gitignore rules.
if command -v git >/dev/null; then git init -q "$dest"; fi

# The collections named in galaxy.yml's dependencies, and theirs, linked from the ansible package, so
# that doc fragments, module_utils and action groups of amazon.aws and others resolve.
python - "$root/galaxy.yml" "$build_root" <<'PY'
import json
import os
import sys

import yaml
import ansible_collections

galaxy, build_root = sys.argv[1:]
installed = [path for path in ansible_collections.__path__ if os.path.isdir(path)]
with open(galaxy, encoding="utf-8") as stream:
    pending = list((yaml.safe_load(stream) or {}).get("dependencies") or {})
seen = set()
while pending:
    name = pending.pop()
    if name in seen:
        continue
    seen.add(name)
    namespace, collection = name.split(".")
    source = next((os.path.join(path, namespace, collection) for path in installed
                   if os.path.isdir(os.path.join(path, namespace, collection))), None)
    if source is None:
        sys.exit(f"The collection {name} (a dependency of cicc.cloud) is not installed in .venv: run 'make setup'")
    link = os.path.join(build_root, namespace, collection)
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(source, link)
    manifest = os.path.join(source, "MANIFEST.json")
    if os.path.exists(manifest):
        with open(manifest, encoding="utf-8") as stream:
            pending.extend(json.load(stream)["collection_info"].get("dependencies") or {})
print("==> Dependencies linked: " + ", ".join(sorted(seen)))
PY

# `--skip-test NAME` for a test that cannot run here at all, each with its reason. None so far: with
# the pip stand-in above, every test that applies to the collection runs offline.
skips=()

log "ansible-test sanity --python $python_version --requirements --junit ${skips[*]} $*"
start=$SECONDS
status=0
(cd "$dest" && ansible-test sanity --python "$python_version" --requirements --junit --color no "${skips[@]}" "$@") || status=$?
elapsed=$((SECONDS - start))

# One line per test from ansible-test's JUnit reports, then the totals.
python - "$dest/tests/output/junit" "$elapsed" <<'PY' || true
import glob
import os
import sys
import xml.etree.ElementTree as ET

junit_dir, elapsed = sys.argv[1:]
counts = {"passed": 0, "failed": 0, "skipped": 0}
reports = sorted(glob.glob(os.path.join(junit_dir, "*.xml")))
if not reports:
    sys.exit(f"==> No sanity test reported a result ({elapsed} s): ansible-test stopped before running them")
print(f"==> Sanity summary ({elapsed} s)")
for path in reports:
    for case in ET.parse(path).iter("testcase"):
        failures = case.findall("failure") + case.findall("error")
        skipped = case.find("skipped")
        if failures:
            errors = sum(len((f.text or "").strip().splitlines()) for f in failures)
            outcome, detail = "failed", f"{errors} error(s)"
        elif skipped is not None:
            outcome, detail = "skipped", (skipped.text or skipped.get("message") or "").strip()
        else:
            outcome, detail = "passed", ""
        counts[outcome] += 1
        print(f"    {outcome:8} {case.get('name')}" + (f"  ({detail})" if detail else ""))
print("Sanity: {passed} passed, {failed} failed, {skipped} skipped".format(**counts))
PY

if [ "$status" -ne 0 ]; then
  log "Sanity FAILED (ansible-test exit $status): the errors are listed above, and in $dest/tests/output/bot/"
fi
exit "$status"
