#!/usr/bin/env bash
# Build the collection's HTML documentation with antsibull-docs and Sphinx (the tools in .venv-docs,
# ansible-doc from .venv): a page per module, filter and role, the roles' argument specs included
# (cicc.cloud.cicc documents every setting). The index is .build/docs/html/index.html.
#
#   1. `antsibull-docs lint-collection-docs --plugin-docs` checks the plugins' and roles' docs;
#      what it finds is printed, the build goes on, and the script fails at the end.
#   2. `antsibull-docs sphinx-init` writes the Sphinx project in .build/docs (conf.py, rst/index.rst),
#      made offline: no intersphinx, so references into other collections (amazon.aws, ...) and to
#      docs.ansible.com stay plain text. The lint (with --validate-collection-refs dependent) is what
#      checks those.
#   3. `antsibull-docs collection` writes the collection's RST into .build/docs/rst.
#   4. `sphinx-build -W` makes the HTML: any warning (a broken reference in our docs) fails the build.
#
# .build/docs is removed and rebuilt on every run; nothing else is touched.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=$root/.build/docs
docs_bin=$root/.venv-docs/bin
log() { printf '==> %s\n' "$*"; }
die() { printf 'docs.sh: %s\n' "$*" >&2; exit 1; }

export PATH="$root/.venv/bin:$PATH"
export ANSIBLE_CONFIG="$root/ansible.cfg"

for tool in antsibull-docs sphinx-build; do
  [ -x "$docs_bin/$tool" ] || die "$tool is not in $root/.venv-docs: run 'make setup' (scripts/setup.sh) first"
done
command -v ansible-doc >/dev/null || die "ansible-doc is not in $root/.venv: run 'make setup' first"
[ -e .collections/ansible_collections/cicc/cloud/galaxy.yml ] ||
  die "the collection link .collections/ansible_collections/cicc/cloud is missing: run 'make setup'"

start=$SECONDS

# The linter copies the collection and its dependencies (galaxy.yml) to a scratch tree, with git
# when a path is inside a git work tree. amazon.aws and community.docker live in .venv, inside this
# repository's work tree but ignored by git, so they would be copied empty (and every doc fragment
# of amazon.aws be "unknown"): git must not look above .venv.
log "Linting the collection's docs (antsibull-docs lint-collection-docs --plugin-docs)"
if GIT_CEILING_DIRECTORIES="$root/.venv" \
  "$docs_bin/antsibull-docs" lint-collection-docs --plugin-docs --validate-collection-refs dependent .; then
  lint_failed=0
else
  lint_failed=1
fi

log "Writing the Sphinx project into $out"
rm -rf "$out"
mkdir -p "$root/.build"
# antsibull-docs writes only into directories that are writable by their owner alone.
mkdir -m 0755 "$out"
"$docs_bin/antsibull-docs" sphinx-init --use-current --dest-dir "$out" \
  --project cicc.cloud --title 'cicc.cloud documentation' --copyright 'cicc.cloud developers' \
  --extra-conf 'html_title=cicc.cloud documentation' cicc.cloud >/dev/null
# The start page's heading, instead of the template's "Welcome to my Ansible collection documentation".
sed -i 's/^Welcome to my Ansible collection documentation$/cicc.cloud documentation/' "$out/rst/index.rst"
cat >>"$out/conf.py" <<'PY'

# Added by scripts/docs.sh: an offline build. No intersphinx, so no inventory is fetched from
# docs.ansible.com or docs.python.org; the references that only those inventories resolve (other
# collections' plugins, ansible-core's docsite pages that antsibull-docs' templates name) stay
# plain text instead of warnings. References within cicc.cloud are still checked.
extensions = [ext for ext in extensions if ext != 'sphinx.ext.intersphinx']
del intersphinx_mapping
nitpick_ignore_regex = [
    ('std:ref', r'ansible_collections\.(?!cicc\.cloud\.).*'),
    ('std:ref', r'common_return_values|ansible_configuration_settings'),
]
PY

log "Writing the collection's RST (antsibull-docs collection)"
chmod og-w "$out/rst"
"$docs_bin/antsibull-docs" --config-file "$out/antsibull-docs.cfg" collection \
  --use-current --fail-on-error --cleanup everything --dest-dir "$out/rst" cicc.cloud

log "Building the HTML (sphinx-build -W)"
"$docs_bin/sphinx-build" -q -W --keep-going -b html -c "$out" -d "$out/doctrees" "$out/rst" "$out/html" ||
  die "sphinx-build failed: the warnings above name the RST file (in $out/rst) and line"

log "Documentation built in $((SECONDS - start)) s: $out/html/index.html"
[ "$lint_failed" = 0 ] || die "antsibull-docs lint-collection-docs found problems in the docs (printed above): fix them"
