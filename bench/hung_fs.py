#!/usr/bin/env python3
"""What a hung file system costs `profiler record`: a process runs from a FUSE
mount that then stops answering (every request blocks, like an NFS server gone
away), beside a process running from a healthy disk. Prints how long the
recording took, whether the healthy process's call chain was named, and what the
profiler said and counted. A script that prints figures, not a test: it exits 0
whatever they are (non-zero only when it could not run).

Needs root, gcc, Debian's libfuse2 and a Python with fusepy:
    apt-get install libfuse2 && python3 -m venv /tmp/fusevenv && /tmp/fusevenv/bin/pip install fusepy
    sudo /tmp/fusevenv/bin/python bench/hung_fs.py [--profiler target/release/profiler]
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAIN = ("main", "chain_outer", "chain_middle", "chain_inner", "spin_leaf")


def serve(source, mount, freeze):
    """The file system: a read-only mirror of `source` whose every call waits while
    the file `freeze` exists."""
    from fuse import FUSE, FuseOSError, Operations

    class Freezable(Operations):
        def _wait(self):
            while os.path.exists(freeze):
                time.sleep(0.05)

        def _path(self, path):
            return os.path.join(source, path.lstrip("/"))

        def getattr(self, path, fh=None):
            self._wait()
            try:
                st = os.lstat(self._path(path))
            except OSError as e:
                raise FuseOSError(e.errno)
            keys = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime",
                    "st_nlink", "st_size", "st_uid", "st_ino")
            return {k: getattr(st, k) for k in keys}

        def readdir(self, path, fh):
            self._wait()
            return [".", ".."] + os.listdir(self._path(path))

        def open(self, path, flags):
            self._wait()
            return os.open(self._path(path), os.O_RDONLY)

        def read(self, path, size, offset, fh):
            self._wait()
            os.lseek(fh, offset, 0)
            return os.read(fh, size)

        def release(self, path, fh):
            os.close(fh)

    # No attribute or entry caching: every stat reaches the server.
    FUSE(Freezable(), mount, foreground=True, ro=True, allow_other=True,
         attr_timeout=0, entry_timeout=0)


def build_chain(out):
    src = os.path.join(ROOT, "tests", "programs", "chain.c")
    subprocess.run(["gcc", "-O0", "-g", "-fno-omit-frame-pointer", "-I",
                    os.path.dirname(src), "-o", out, src], check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profiler", default=os.path.join(ROOT, "target/release/profiler"))
    ap.add_argument("--duration", type=int, default=3, help="seconds recorded")
    ap.add_argument("--wait", type=int, default=180,
                    help="seconds to wait for the profile to be written")
    ap.add_argument("--serve", nargs=3, metavar=("SOURCE", "MOUNT", "FREEZE"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(*args.serve)
        return 0
    if os.geteuid() != 0:
        print("hung_fs: needs root (FUSE mount, eBPF)", file=sys.stderr)
        return 2
    try:
        import fuse  # noqa: F401
    except (ImportError, OSError) as e:
        print(f"hung_fs: needs fusepy and libfuse2 ({e}); see the top of this file",
              file=sys.stderr)
        return 2
    if not os.access(args.profiler, os.X_OK):
        print(f"hung_fs: no profiler at {args.profiler} (cargo build --release)",
              file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="hung-fs-") as tmp:
        source, mount, out = (os.path.join(tmp, d) for d in ("src", "mnt", "out"))
        freeze = os.path.join(tmp, "FREEZE")
        for d in (source, mount):
            os.mkdir(d)
        build_chain(os.path.join(source, "on_fuse"))
        build_chain(os.path.join(tmp, "on_disk"))
        server = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve",
                                   source, mount, freeze])
        procs = []
        try:
            deadline = time.time() + 10
            while not os.path.exists(os.path.join(mount, "on_fuse")):
                if time.time() > deadline or server.poll() is not None:
                    print("hung_fs: the FUSE file system did not come up", file=sys.stderr)
                    return 1
                time.sleep(0.1)
            procs.append(subprocess.Popen([os.path.join(mount, "on_fuse"), "120"]))
            procs.append(subprocess.Popen([os.path.join(tmp, "on_disk"), "120"]))
            time.sleep(1)
            open(freeze, "w").close()
            time.sleep(0.3)
            started = time.monotonic()
            rec = subprocess.Popen([args.profiler, "record", "--duration", str(args.duration),
                                    "--output-dir", out],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            lines, written_at = [], None
            # Read on a thread, so that a profiler that never writes cannot hold the
            # script past --wait.
            import queue
            import threading
            got = queue.Queue()
            threading.Thread(target=lambda: [got.put(l) for l in rec.stdout] + [got.put(None)],
                             daemon=True).start()
            # The profile is written once its paths are printed; the process itself
            # cannot exit while one of its threads waits on the frozen file system.
            while True:
                left = args.wait - (time.monotonic() - started)
                try:
                    line = got.get(timeout=max(left, 0.01))
                except queue.Empty:
                    break
                if line is None:
                    break
                lines.append(line.rstrip("\n"))
                if line.startswith("  ") and line.rstrip().endswith("profile.folded"):
                    written_at = time.monotonic() - started
                    break
        finally:
            if os.path.exists(freeze):
                os.unlink(freeze)
            for p in procs:
                p.kill()
                p.wait()
        try:
            rec.wait(timeout=60)
        except subprocess.TimeoutExpired:
            rec.kill()
            rec.wait()
        exited_at = time.monotonic() - started
        time.sleep(0.2)
        while not got.empty():
            line = got.get()
            if line is not None:
                lines.append(line.rstrip("\n"))
        subprocess.run(["umount", mount], check=False)
        server.wait(timeout=10)

        folded = os.path.join(out, "profile.folded")
        stacks = open(folded).read().splitlines() if os.path.exists(folded) else []
        def named(prog):
            total = chained = 0
            for s in stacks:
                frames, count = s.rsplit(" ", 1)
                frames = frames.split(";")
                if frames[0] != prog:
                    continue
                total += int(count)
                if all(f in frames for f in CHAIN):
                    chained += int(count)
            return chained, total

        print(f"\n`profiler record --duration {args.duration}` with a process running from a "
              "frozen FUSE mount and one from disk:")
        if written_at is None:
            print(f"  profile written: NO, not within {args.wait} s; the process exited "
                  f"{exited_at - args.wait:.1f} s after the file system answered again")
        else:
            print(f"  profile written after {written_at:.1f} s "
                  f"({args.duration} s recorded); process exit {rec.returncode} after "
                  f"{exited_at:.1f} s, once the file system answered again")
        for prog, what in (("on_disk", "healthy process"), ("on_fuse", "process on the frozen mount")):
            chained, total = named(prog)
            print(f"  {what}: {chained} of {total} samples with its whole call chain named")
        for line in lines:
            if line.startswith("warning:") or "captures given up" in line or "unnamed addresses" in line:
                print(f"  said: {line.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
