#!/usr/bin/env bash
# WordNet 3.0 for METEOR (nltk reads it; llmkit never downloads it), from Debian's packages `wordnet-base` and
# `wordnet-sense-index`, copied (not linked) to DIR/corpora/wordnet with the `lexnames` file Debian leaves out.
# nltk finds DIR when it is the virtual environment's nltk_data (sys.prefix/nltk_data) or when NLTK_DATA=DIR.
#
#   scripts/install-wordnet.sh .venv/nltk_data        (make runs this; apt-get needs root)
set -euo pipefail
dest="${1:?usage: $0 DIR}/corpora/wordnet"
src=/usr/share/wordnet
if [ -f "$dest/lexnames" ] && [ -f "$dest/data.noun" ] && [ -f "$dest/index.sense" ]; then
  exit 0
fi
if [ ! -f "$src/data.noun" ] || [ ! -f "$src/index.sense" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q wordnet-base wordnet-sense-index >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q wordnet-base wordnet-sense-index >/dev/null; }
  else
    echo "METEOR needs WordNet 3.0: run (as root) 'apt-get install wordnet-base wordnet-sense-index', then 'make wordnet'" >&2
    exit 1
  fi
fi
mkdir -p "$dest"
for f in "$src"/*; do
  [ -f "$f" ] && cp -L "$f" "$dest/"
done
# The lexicographer files, numbered as WordNet 3.0 numbers them (lexnames(5WN)): number, name, syntactic category.
lexnames="adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition
noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object noun.person
noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape noun.state noun.substance
noun.time verb.body verb.change verb.cognition verb.communication verb.competition verb.consumption verb.contact
verb.creation verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
n=0
: > "$dest/lexnames.tmp"
for name in $lexnames; do
  case "$name" in noun.*) cat=1 ;; verb.*) cat=2 ;; adj.*) cat=3 ;; adv.*) cat=4 ;; esac
  printf '%02d\t%s\t%d\n' "$n" "$name" "$cat" >> "$dest/lexnames.tmp"
  n=$((n + 1))
done
mv "$dest/lexnames.tmp" "$dest/lexnames"
echo "WordNet 3.0 -> $dest"
