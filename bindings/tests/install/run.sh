#!/bin/sh
# Install libkvwire to a fresh prefix, then build a C and a C++ program against it through
# pkg-config alone, in a folder outside the source and build trees, and run them.
#   run.sh CMAKE BUILD_DIR CC CXX PKG_CONFIG    (ctest passes these)
set -eu
cmake=$1 build=$2 cc=$3 cxx=$4 pkg_config=$5
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/kvwire-install-test.XXXXXX")
trap 'rm -rf "$work"' EXIT
prefix="$work/prefix"

"$cmake" --install "$build" --prefix "$prefix" >/dev/null
pc=$(find "$prefix" -name kvwire.pc)
PKG_CONFIG_PATH=$(dirname "$pc")
export PKG_CONFIG_PATH
test "$("$pkg_config" --variable=prefix kvwire)" = "$prefix" || {
  echo "kvwire.pc: prefix is $("$pkg_config" --variable=prefix kvwire), installed to $prefix"; exit 1; }
echo "pkg-config: kvwire $("$pkg_config" --modversion kvwire): $("$pkg_config" --cflags --libs kvwire)"
test -L "$(dirname "$pc")/../libkvwire.so" || { echo "libkvwire.so: the link for -lkvwire is missing"; exit 1; }

cp "$here/consumer.c" "$here/consumer.cpp" "$work/"
cd "$work"
# shellcheck disable=SC2046 # pkg-config's flags are words
"$cc" -std=c11 -Wall -Wextra -Wpedantic -Werror consumer.c $("$pkg_config" --cflags --libs kvwire) -o consumer_c
# shellcheck disable=SC2046
"$cxx" -std=c++17 -Wall -Wextra -Wpedantic -Werror consumer.cpp $("$pkg_config" --cflags --libs kvwire) -o consumer_cpp
needed=$(readelf -d consumer_c | sed -n 's/.*NEEDED.*\[\(libkvwire[^]]*\)\].*/\1/p')
test "$needed" = "libkvwire.so.$("$pkg_config" --modversion kvwire | cut -d. -f1)" || {
  echo "consumer_c needs '$needed', not the soname libkvwire.so.MAJOR"; exit 1; }
./consumer_c
./consumer_cpp
