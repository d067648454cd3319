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
# Already enabled: an active line or stanza names the suite.
if grep -Eqs "^(deb .* $suite( |\$)|Suites:(.* )?$suite( |\$))" \
  /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; then
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi

# deb822: Debian's own stanza (its URI or keyring says Debian) whose
# Suites has the bare codename gets the suite too; a third-party stanza
# naming the codename is left alone.
for file in /etc/apt/sources.list.d/*.sources; do
  [ -f "$file" ] || continue
  updated=$(awk -v codename="$codename" -v suite="$suite" '
    function flush() {
      if (n == 0) return
      debian = (stanza ~ /\nURIs:[^\n]*debian\.org\/debian([ \/]|\n)/ || stanza ~ /debian-archive-keyring/)
      for (i = 1; i <= n; i++) {
        line = lines[i]
        if (debian && line ~ "^Suites:(.* )?" codename "( |$)") { line = line " " suite; changed = 1 }
        print line
      }
      n = 0; stanza = ""
    }
    /^[[:space:]]*$/ { flush(); print; next }
    { lines[++n] = $0; stanza = stanza "\n" $0 }
    END { flush(); exit changed ? 0 : 1 }
  ' "$file") || continue
  printf '%s\n' "$updated" | $sudo tee "$file" >/dev/null
  echo "backports: added $suite to $file"
  exit 0
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
