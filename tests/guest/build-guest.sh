#!/bin/bash
# Build a tiny Linux guest for libvirt-fleece tests: a Debian cloud kernel plus a
# busybox initramfs, booted directly by libvirt (<os><kernel>/<initrd>/<cmdline>).
#
# Usage: build-guest.sh [OUTDIR]      (default /var/lib/libvirt/images/fleece-guest)
#
# Produces OUTDIR/vmlinuz and OUTDIR/initrd.img (0644, OUTDIR 0755) plus
# OUTDIR/build-info.txt. Nothing is installed on the host: the packages are
# fetched with `apt-get download` and unpacked with `dpkg-deb -x` in a temp dir.
# Skips all work when both outputs exist and are newer than this script
# (set FLEECE_GUEST_FORCE=1 to rebuild anyway).
#
# Environment:
#   FLEECE_GUEST_KERNEL_META  meta package to resolve the kernel from
#                             (default linux-image-cloud-amd64)
#   FLEECE_GUEST_KERNEL_PKG   exact kernel package (skips the resolution)
#   FLEECE_GUEST_FORCE=1      rebuild even if outputs are up to date
#
# Guest behaviour is chosen on the kernel command line, see README.md:
#   fleece.mode=counter | poweroff | poweroff-after | idle (default)
#   fleece.delay=SECONDS   (poweroff-after: seconds after boot before powering off; default 5)
set -euo pipefail
umask 022

OUT=${1:-/var/lib/libvirt/images/fleece-guest}
SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
KERNEL_META=${FLEECE_GUEST_KERNEL_META:-linux-image-cloud-amd64}
# Modules the guest needs; their dependencies are added automatically.
ROOT_MODULES=(virtio_pci virtio_blk)

log() { echo "build-guest: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

if [[ ${FLEECE_GUEST_FORCE:-0} != 1 && -f $OUT/vmlinuz && -f $OUT/initrd.img \
      && $OUT/vmlinuz -nt $SCRIPT && $OUT/initrd.img -nt $SCRIPT ]]; then
    log "up to date: $OUT/vmlinuz $OUT/initrd.img"
    exit 0
fi

for tool in apt-get apt-cache dpkg-deb gzip find; do
    command -v "$tool" >/dev/null || die "missing tool: $tool"
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/fleece-guest-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- fetch ----------------------------------------------------------------
if [[ -n ${FLEECE_GUEST_KERNEL_PKG:-} ]]; then
    KPKG=$FLEECE_GUEST_KERNEL_PKG
else
    KPKG=$(apt-cache depends "$KERNEL_META" 2>/dev/null \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2 }' | head -n1 || true)
    [[ -n $KPKG ]] || die "cannot resolve the kernel package of $KERNEL_META (run apt-get update?)"
fi
log "kernel package: $KPKG"

mkdir -p "$WORK/debs"
# apt-get download as root drops privileges to _apt: let it reach and write there.
if [[ $(id -u) == 0 ]] && id _apt >/dev/null 2>&1; then
    chmod 0755 "$WORK"
    chown _apt "$WORK/debs"
fi
(cd "$WORK/debs" && apt-get download -q "$KPKG" busybox-static >&2) \
    || die "apt-get download $KPKG busybox-static failed"
kdeb=$(ls "$WORK"/debs/"$KPKG"_*.deb)
bdeb=$(ls "$WORK"/debs/busybox-static_*.deb)
KVERSION=$(dpkg-deb -f "$kdeb" Version)
BVERSION=$(dpkg-deb -f "$bdeb" Version)

# --- unpack ---------------------------------------------------------------
dpkg-deb -x "$kdeb" "$WORK/kernel"
dpkg-deb -x "$bdeb" "$WORK/busybox"

# Debian 12 ships modules under lib/modules, Debian 13 (merged /usr) under usr/lib/modules.
shopt -s nullglob
kvers=("$WORK"/kernel/lib/modules/* "$WORK"/kernel/usr/lib/modules/*)
shopt -u nullglob
[[ ${#kvers[@]} == 1 && -d ${kvers[0]} ]] || die "expected one module tree in $KPKG"
MODDIR=${kvers[0]}
KVER=${MODDIR##*/}
VMLINUZ=$WORK/kernel/boot/vmlinuz-$KVER
[[ -f $VMLINUZ ]] || die "no /boot/vmlinuz-$KVER in $KPKG"
# Debian 12: /bin/busybox; Debian 13: /usr/bin/busybox.
BUSYBOX=
for b in "$WORK/busybox/bin/busybox" "$WORK/busybox/usr/bin/busybox"; do
    [[ -x $b && ! -L $b ]] && { BUSYBOX=$b; break; }
done
[[ -n $BUSYBOX ]] || die "no /bin/busybox or /usr/bin/busybox in busybox-static"

# --- resolve modules --------------------------------------------------------
# The package has no modules.dep (depmod runs at install time): read the
# depends= field of each module's .modinfo section instead.
mod_path() {  # name -> path of its .ko[.xz|.zst|.gz], empty if none
    local n=$1
    find "$MODDIR" -type f \( -name "$n.ko" -o -name "$n.ko.*" \
        -o -name "${n//_/-}.ko" -o -name "${n//_/-}.ko.*" \) -print -quit
}
mod_builtin() {
    local n=$1
    [[ -f $MODDIR/modules.builtin ]] &&
        grep -qE "/(${n}|${n//_/-})\.ko\$" "$MODDIR/modules.builtin"
}
mod_plain() {  # path -> uncompressed module on stdout
    case $1 in
        *.ko) cat "$1" ;;
        *.ko.xz) xz -dc "$1" ;;
        *.ko.zst) zstd -dcq "$1" ;;
        *.ko.gz) gzip -dc "$1" ;;
        *) die "unknown module format: $1" ;;
    esac
}

declare -A SEEN=()
ORDER=()
mkdir -p "$WORK/mods"
add_module() {
    local n=${1//-/_} path deps d
    [[ -n ${SEEN[$n]:-} ]] && return 0
    SEEN[$n]=1
    if mod_builtin "$n"; then
        log "module $n is built in"
        return 0
    fi
    path=$(mod_path "$n")
    [[ -n $path ]] || die "module $n not found in $KPKG"
    mod_plain "$path" >"$WORK/mods/$n.ko"
    deps=$(tr '\0' '\n' <"$WORK/mods/$n.ko" | awk -F= '$1 == "depends" && !done { print substr($0, 9); done = 1 }')
    local IFS=,
    for d in $deps; do
        [[ -n $d ]] && add_module "$d"
    done
    ORDER+=("$n")
}
for m in "${ROOT_MODULES[@]}"; do
    add_module "$m"
done
log "modules in load order: ${ORDER[*]}"

# --- initramfs ------------------------------------------------------------
ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,lib/modules}
install -m 0755 "$BUSYBOX" "$ROOT/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    [[ $applet == busybox ]] || ln -sf busybox "$ROOT/bin/$applet"
done
for n in "${ORDER[@]}"; do
    install -m 0644 "$WORK/mods/$n.ko" "$ROOT/lib/modules/$n.ko"
    echo "$n" >>"$ROOT/lib/modules/load-order"
done
echo "$KPKG $KVERSION" >"$ROOT/lib/modules/kernel-package"
if [[ $(id -u) == 0 ]]; then
    mknod -m 0600 "$ROOT/dev/console" c 5 1
fi

cat >"$ROOT/init" <<'INIT'
#!/bin/sh
# libvirt-fleece test guest init (busybox). Mode from fleece.mode= on the cmdline.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1

log() { echo "fleece-guest: $*"; }
idle() { while :; do sleep 3600; done; }

for m in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$m.ko" || log "insmod $m failed"
done

mode=idle
delay=5
for w in $(cat /proc/cmdline); do
    case $w in
    fleece.mode=*) mode=${w#fleece.mode=} ;;
    fleece.delay=*) delay=${w#fleece.delay=} ;;
    esac
done
case $delay in ''|*[!0-9]*) log "bad fleece.delay=$delay, using 5"; delay=5 ;; esac

disks() {  # whole virtio disks, vda..vdz then vdaa.., in order
    for d in /dev/vd[a-z] /dev/vd[a-z][a-z]; do
        [ -b "$d" ] && echo "$d"
    done
}

log "mode=$mode uptime=$(cut -d' ' -f1 /proc/uptime)s disks:" $(disks)

case $mode in
counter)
    n=0
    while [ -z "$(disks)" ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
    list=$(disks)
    if [ -z "$list" ]; then
        log "counter: no /dev/vd* disk found"
        idle
    fi
    # O_DIRECT so every write reaches qemu at once; fall back to fsync.
    ddflags="conv=notrunc oflag=direct"
    for d in $list; do
        if ! dd if=$d of=$d bs=512 count=1 conv=notrunc oflag=direct 2>/dev/null; then
            ddflags="conv=notrunc,fsync"
        fi
    done
    log "counter: writing sector 0 of" $list "($ddflags)"
    i=0
    errors=0
    while :; do
        i=$((i + 1))
        for d in $list; do
            printf '%-511s\n' "$i" | dd of=$d bs=512 count=1 iflag=fullblock $ddflags 2>/dev/null \
                || errors=$((errors + 1))
        done
        if [ $i -eq 1 ]; then
            log "counter: first write done uptime=$(cut -d' ' -f1 /proc/uptime)s"
        elif [ $((i % 100)) -eq 0 ]; then
            log "counter: $i errors=$errors"
        fi
    done
    ;;
poweroff)
    log "poweroff"
    sync
    poweroff -f
    idle
    ;;
poweroff-after)
    # a guest that shuts itself down from inside while the host works on it
    log "poweroff-after: powering off in ${delay}s"
    sleep "$delay"
    log "poweroff-after: poweroff now uptime=$(cut -d' ' -f1 /proc/uptime)s"
    sync
    poweroff -f
    idle
    ;;
idle)
    idle
    ;;
*)
    log "unknown fleece.mode=$mode, idling"
    idle
    ;;
esac
idle
INIT
chmod 0755 "$ROOT/init"

(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort | "$BUSYBOX" cpio -o -H newc 2>/dev/null) \
    | gzip -9 >"$WORK/initrd.img"

# --- install ----------------------------------------------------------------
mkdir -p "$OUT"
chmod 0755 "$OUT"
install -m 0644 "$VMLINUZ" "$OUT/.vmlinuz.tmp"
install -m 0644 "$WORK/initrd.img" "$OUT/.initrd.img.tmp"
cat >"$OUT/.build-info.tmp" <<EOF
kernel_package=$KPKG
kernel_version=$KVERSION
kernel_release=$KVER
busybox_package=busybox-static
busybox_version=$BVERSION
modules=${ORDER[*]}
cmdline_example=console=ttyS0 panic=-1 quiet fleece.mode=counter
EOF
chmod 0644 "$OUT/.build-info.tmp"
mv -f "$OUT/.build-info.tmp" "$OUT/build-info.txt"
mv -f "$OUT/.vmlinuz.tmp" "$OUT/vmlinuz"
mv -f "$OUT/.initrd.img.tmp" "$OUT/initrd.img"
touch "$OUT/vmlinuz" "$OUT/initrd.img"
log "built $OUT/vmlinuz ($KPKG $KVERSION) and $OUT/initrd.img ($(stat -c %s "$OUT/initrd.img") bytes)"
