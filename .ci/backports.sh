#!/usr/bin/env bash
# Enables Debian's backports suite (Valkey 8 comes from there on Debian 12)
# by adding `<codename>-backports` to the machine's existing Debian source
# entry, with that entry's own URI. Prints nothing and changes nothing when
# the suite is already there. deb822 (`*.sources`) and one-line
# (`sources.list`) entries are both understood.
set -euo pipefail
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ -n "$codename" ] || { echo "backports: no VERSION_CODENAME in /etc/os-release" >&2; exit 1; }
suite="$codename-backports"
if grep -rqs -- "$suite" /etc/apt/sources.list /etc/apt/sources.list.d/; then exit 0; fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi

# deb822: the stanza whose Suites has the bare codename gets the suite too.
for file in /etc/apt/sources.list.d/*.sources; do
  [ -f "$file" ] || continue
  if grep -Eq "^Suites:(.* )?$codename( |$)" "$file"; then
    $sudo sed -E -i "s/^(Suites:(.* )?$codename( .*)?)$/\1 $suite/" "$file"
    echo "backports: added $suite to $file"
    exit 0
  fi
done
# One-line format: the first `deb <uri> <codename> <components>` line,
# repeated for the suite.
line=$(grep -Eh "^deb +(\[[^]]*\] +)?[^ ]+ +$codename +" /etc/apt/sources.list 2>/dev/null | head -1 || true)
if [ -n "$line" ]; then
  echo "$line" | sed -E "s/ $codename / $suite /" | $sudo tee -a /etc/apt/sources.list >/dev/null
  echo "backports: added $suite to /etc/apt/sources.list"
  exit 0
fi
echo "backports: no Debian source entry for $codename found" >&2
exit 1
