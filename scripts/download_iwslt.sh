#!/usr/bin/env bash
# Download IWSLT 2016 or 2017 German-English (TED talks) into DEST, in the raw layout that
# `--data DEST` reads: train.tags.de-en.{de,en} and IWSLT1x.TED.<set>.de-en.{de,en}.xml.
#
# Usage: scripts/download_iwslt.sh 2016|2017 DEST
# Environment overrides: IWSLT_URL (download address; file:///path/to/archive takes an archive
# fetched elsewhere), EXPECTED_SHA256 (archive checksum),
# EXPECTED_GIT_BLOB (git's blob hash of the archive, what `git hash-object FILE` prints).
#
# Sources (the wit3.fbk.eu links used by Kyubyong/transformer are dead):
#   2016: Google Drive copy of the WIT3 "2016-01" release (all language pairs; the same file
#         torchtext's IWSLT2016 uses).  The SHA-256 below is the one Transformers.jl registers
#         for that file: ONE source, not checked by this project (no internet where this was
#         written); the script says so when it verifies against it.
#   2017: the WIT3 archive mirror on GitHub (hlt-mt/WIT3, which sacrebleu also downloads from).
#         The mirror's git tree lists archive/2017-01-trnted/texts/de/en/de-en.tgz as blob
#         cca21523e6528b2d7748a5c058684f406048200d: git's hash of "blob <size>\0" + the file,
#         checked here without git (an independent check of the bytes, whatever the server).
set -euo pipefail

die() { echo "download_iwslt: $*" >&2; exit 1; }

[[ $# -eq 2 ]] || die "usage: $0 2016|2017 DEST"
year=$1
dest=$2

case $year in
  2016)
    url=${IWSLT_URL:-"https://drive.usercontent.google.com/download?id=1l5y6Giag9aRPwGtuZHswh3w5v3qEz8D8&export=download&confirm=t"}
    expected=${EXPECTED_SHA256-425a3688e0faff00ed4d6d04f1664d1edbd9932e5b17a73680aa81a70f03e2d6}
    expected_blob=${EXPECTED_GIT_BLOB-}
    sha256_source="Transformers.jl's registry (one source, not checked by this project)"
    ;;
  2017)
    url=${IWSLT_URL:-"https://github.com/hlt-mt/WIT3/raw/master/archive/2017-01-trnted/texts/de/en/de-en.tgz"}
    expected=${EXPECTED_SHA256-}
    expected_blob=${EXPECTED_GIT_BLOB-cca21523e6528b2d7748a5c058684f406048200d}
    sha256_source="EXPECTED_SHA256"
    ;;
  *) die "year must be 2016 or 2017, not '$year'" ;;
esac

[[ -e $dest/train.tags.de-en.de ]] && die "$dest already holds train.tags.de-en.de; remove it first"
command -v curl >/dev/null || die "curl is needed"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

by_hand() {  # how to go on when this machine cannot download the archive
  local check=${expected:+SHA-256 $expected}${expected_blob:+git blob hash $expected_blob}
  cat >&2 <<EOF
download_iwslt: download failed: $url
  Without network here: fetch that archive on another machine, copy it here, and run
    IWSLT_URL=file:///full/path/to/the/archive $0 $year $dest
  which checks it (${check:-no known hash}) and unpacks it. Or place the files by hand:
  $dest/train.tags.de-en.de and .en, and $dest/IWSLT${year#20}.TED.<set>.de-en.de.xml and .en.xml
  for the dev and test sets (tst2013, tst2014, ...). README.md "Train on IWSLT" says more.
EOF
  exit 1
}

echo "downloading IWSLT $year de-en from $url"
curl -fsSL --retry 2 -o "$work/archive" "$url" || by_hand

digest() {  # digest sha1|sha256: of standard input
  if command -v "${1}sum" >/dev/null; then "${1}sum" | cut -d' ' -f1
  else shasum -a "${1#sha}" | cut -d' ' -f1; fi
}
actual=$(digest sha256 < "$work/archive")
size=$(wc -c < "$work/archive" | tr -d ' ')
blob=$({ printf 'blob %s\0' "$size"; cat "$work/archive"; } | digest sha1)
echo "SHA-256 of the archive: $actual; git blob hash: $blob ($size bytes)"
verified=0
if [[ -n $expected_blob ]]; then
  [[ $blob == "$expected_blob" ]] || die "git blob hash mismatch: expected $expected_blob, got $blob"
  echo "verified: git blob hash $blob"
  verified=1
fi
if [[ -n $expected ]]; then
  [[ $actual == "$expected" ]] || die "checksum mismatch: expected $expected, got $actual (set EXPECTED_SHA256 to override)"
  echo "verified: SHA-256 from $sha256_source"
  verified=1
fi
[[ $verified == 1 ]] || echo "WARNING: the archive is NOT verified (no expected hash for $year)" >&2

mkdir -p "$work/x"
if [[ $url == *.zip ]]; then
  unzip -q "$work/archive" -d "$work/x" || die "cannot unpack the zip archive"
else
  tar -xzf "$work/archive" -C "$work/x" || die "cannot unpack the archive (not a .tgz?)"
fi
# The 2016 release nests one archive per language pair: 2016-01/texts/de/en/de-en.tgz.
inner=$(find "$work/x" -path '*texts/de/en/de-en.tgz' | head -n 1)
[[ -n $inner ]] && tar -xzf "$inner" -C "$work/x"

train=$(find "$work/x" -name train.tags.de-en.de | head -n 1)
[[ -n $train ]] || die "no train.tags.de-en.de in the archive"
mkdir -p "$dest"
mv "$(dirname "$train")"/* "$dest"/
echo "IWSLT $year de-en is in $dest:"
ls "$dest"
