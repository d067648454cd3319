#!/usr/bin/env bash
# The library crates as a registry would get them: each is packaged, then
# type-checked from its unpacked package alone, with only the features it
# asks for itself.
#
# `cargo package`'s own verification builds each package with full code
# generation in a workspace of its own, rebuilding the dependencies for
# every package (six minutes of a CI run). This checks the same things (the
# package holds every file its code needs; its manifest names every
# dependency and feature it uses) in about a minute: the unpacked packages
# form one workspace whose `[patch]` resolves their dependencies on each
# other to the packages, never to the workspace's sources, and each is
# checked with `-p`, which resolves features for that package alone.
#
# Their `publish` names a registry configured nowhere (their Cargo.toml
# says why), so the package is prepared for crates.io's index by hand;
# nothing is uploaded. --allow-dirty: a local run checks the tree as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
crates=(redis-topology redis-failover tenant-kv log-buffer)
packages=()
for crate in "${crates[@]}"; do packages+=(-p "$crate"); done
cargo package --no-verify --allow-dirty --index sparse+https://index.crates.io/ "${packages[@]}"
target=${CARGO_TARGET_DIR:-$PWD/target}

# `cargo pkgid` ends in the version: path+file:///…/name#version.
version() { local id; id=$(cargo pkgid -p "$1"); echo "${id##*[#@]}"; }
# A directory of its own, gone when the check ends.
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
members=() patches=() resolvers=()
for crate in "${crates[@]}"; do
  dir="$crate-$(version "$crate")"
  # --touch: a package's files carry a fixed old date, and cargo, which
  # finds these packages at the same relative paths every run, would take
  # an earlier run's check for a fresh one.
  tar --touch -xzf "$target/package/$dir.crate" -C "$root"
  # Cargo reads the resolver from the workspace root only, and warns about
  # a package's own: the one every package states moves to the root.
  resolvers+=("$(sed -n 's/^resolver = //p' "$root/$dir/Cargo.toml")")
  sed -i '/^resolver = /d' "$root/$dir/Cargo.toml"
  members+=("\"$dir\"")
  patches+=("$crate = { path = \"$dir\" }")
done
{
  echo "[workspace]"
  echo "members = [$(IFS=,; echo "${members[*]}")]"
  echo "resolver = ${resolvers[0]}"
  echo
  echo "[patch.crates-io]"
  printf '%s\n' "${patches[@]}"
} > "$root/Cargo.toml"
if [ "$(printf '%s\n' "${resolvers[@]}" | sort -u | wc -l)" -ne 1 ]; then
  echo "the packages state different resolvers: ${resolvers[*]}" >&2
  exit 1
fi
# The workspace's lock file: the versions the workspace was tested with.
cp Cargo.lock "$root/"
# The workspace's target directory: what the two builds share is reused.
export CARGO_TARGET_DIR="$target"
for crate in "${crates[@]}"; do
  (cd "$root" && cargo check -p "$crate")
done
# A `[patch]` that does not apply is only a warning: each crate must have
# come from its unpacked package, not from a registry.
for crate in "${crates[@]}"; do
  if awk -v name="name = \"$crate\"" '/^\[\[package\]\]/ { this = 0 }
    $0 == name { this = 1 } this && /^source = / { found = 1 } END { exit !found }' "$root/Cargo.lock"; then
    echo "$crate was taken from a registry, not from its package" >&2
    exit 1
  fi
done
