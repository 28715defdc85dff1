#!/usr/bin/env bash
# Build dist/llmspyd_VERSION_ARCH.deb: a self-contained virtualenv in /usr/lib/llmspyd (against the
# system /usr/bin/python3.11, with every Python dependency), the precompiled BPF objects inside it,
# the systemd unit, /etc/llmspy/llmspyd.toml, an empty /etc/llmspy/llmspyd.d/, /usr/bin/llmspyd, /usr/bin/llmspy.
# Run from the repository root after `make bpf` (the Makefile's `deb` target does both).
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=/usr/lib/llmspyd
PY=/usr/bin/python3.11
VERSION=$($PY -c 'import tomllib; print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')
ARCH=$(dpkg --print-architecture)
STAGE=build/deb/llmspyd
OUT=dist/llmspyd_${VERSION}_${ARCH}.deb

ls llmspyd/bpf/objects/*.bpf.o >/dev/null || { echo "build-deb: no BPF objects; run make bpf" >&2; exit 1; }

rm -rf "$STAGE"
mkdir -p "$STAGE$PREFIX" "$STAGE/DEBIAN" dist

# the virtualenv is built where it will live inside the staging root, then its paths are rewritten
$PY -m venv "$STAGE$PREFIX"
"$STAGE$PREFIX/bin/pip" install -q --no-compile --disable-pip-version-check .
"$STAGE$PREFIX/bin/pip" uninstall -q -y pip setuptools >/dev/null 2>&1 || true
rm -f "$STAGE$PREFIX"/bin/{activate,activate.csh,activate.fish,Activate.ps1}
# console scripts carry the staging path in their shebang
for f in "$STAGE$PREFIX"/bin/*; do
    [ -f "$f" ] && [ ! -L "$f" ] && sed -i "1s|^#!.*python.*$|#!$PREFIX/bin/python3|" "$f"
done
# python3 in the venv must point at the system interpreter, not into the build host's staging tree
ln -sf "$PY" "$STAGE$PREFIX/bin/python3"
ln -sf python3 "$STAGE$PREFIX/bin/python"
ln -sf python3 "$STAGE$PREFIX/bin/python3.11"
# bytecode now, with the installed paths: the unit's ProtectSystem=strict forbids writing it later
$PY -m compileall -q -j0 -s "$STAGE" -p / "$STAGE$PREFIX/lib" >/dev/null
{ grep -rlF --include='*.py' --include='*.pth' --include='RECORD' --include='direct_url.json' --include='pyvenv.cfg' \
    "$PWD/$STAGE" "$STAGE$PREFIX" || true; } | xargs -r sed -i "s|$PWD/$STAGE||g"

install -D -m 0644 systemd/llmspyd.service "$STAGE/lib/systemd/system/llmspyd.service"
install -D -m 0644 packaging/llmspyd.toml.etc "$STAGE/etc/llmspy/llmspyd.toml"
install -d -m 0755 "$STAGE/etc/llmspy/llmspyd.d"
install -d -m 0755 "$STAGE/usr/bin"
ln -s "$PREFIX/bin/llmspyd" "$STAGE/usr/bin/llmspyd"
ln -s "$PREFIX/bin/llmspy" "$STAGE/usr/bin/llmspy"
install -D -m 0644 README.md "$STAGE/usr/share/doc/llmspyd/README.md"
install -D -m 0644 -t "$STAGE/usr/share/doc/llmspyd/examples" packaging/examples/*

for s in postinst prerm postrm; do install -m 0755 "packaging/debian/$s" "$STAGE/DEBIAN/$s"; done
install -m 0644 packaging/debian/conffiles "$STAGE/DEBIAN/conffiles"
SIZE=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
sed -e "s/@VERSION@/$VERSION/" -e "s/@ARCH@/$ARCH/" -e "s/@SIZE@/$SIZE/" packaging/debian/control.in > "$STAGE/DEBIAN/control"

dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$OUT" >/dev/null
echo "$OUT"
