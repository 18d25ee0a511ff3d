"""Runs *inside* the user's pod (``python3 -I -c <this file> MODE SPEC``) for every exec.

Why: Kubernetes 1.20 speaks only version 4 of the websocket exec protocol, which has no way
to close a process's stdin (v5's close frame came in 1.29/1.30), and an exec has no user
option.  So the gateway sends its input *framed* on the exec's stdin and this helper, started
as root in the pod, drops to the user at once and then:

- ``run``: starts the program (in a pty of its own when asked) in a new session, as sshd does;
  frames carry input data, end of input, signals and window sizes.  Its output comes back
  framed on the exec's stdout (``b`` begun, ``o`` stdout, ``r`` stderr), ended by ``x``
  "status stdout-bytes stderr-bytes" (128 + n when killed by signal n); the helper then waits
  for the gateway's ``a`` (all of it arrived) before it exits, and keeps the exec's stdout and
  stderr open until then.  Why: when an exec ends, the cluster (containerd's CRI streaming,
  the kubelet's and API server's proxies) closes its connection while the output's tail may
  still be queued in it (the gateway holds reading back while the SSH window is full), and an
  input frame that arrives after that close is answered with a TCP reset that discards the
  queue: the tail, the exit status and the close were lost (issue 15).  With the ack the exec
  ends only when nothing is left in flight, and a stream that still ends without its trailer
  is known to be cut.
- ``unix``: connects to a socket file of hers and relays it (``ssh -L`` to a socket path);
  first byte on stdout: ``+`` connected (else the reason on stderr, exit 1).
- ``listen``: listens in her pod for ``ssh -R`` (127.0.0.1:port) or the forwarded agent (a
  socket file), in a fresh 0700 directory of hers under /run/dgw made as root before the
  helper drops to her; first line ``+PORT PATH CTL``, then ``c ID HOST PORT`` per accepted
  connection, which waits for a ``take`` through the control socket CTL (a socket file in
  that directory: only she and root reach it).  Ends, closing and removing everything, when
  its input ends (the gateway closed the exec, or went away); unclaimed connections are
  dropped after CLAIM seconds.
- ``take``: fetches connection ID from a ``listen`` helper's control socket (the file
  descriptor itself, SCM_RIGHTS) and relays it like ``unix``.  One exec per forwarded
  connection, so each has the flow control of its own stream and a slow one holds up no
  other; the price is one exec's set-up (some 60 ms) per connection.

Frame: one type byte, a 4-byte big-endian length, the payload.  Input: ``d`` data, ``e`` end
of input, ``s`` signal name, ``w`` "rows cols", ``a`` output acknowledged.  A real end of the
exec's stdin means the gateway went away: like sshd on a lost client, a pty is hung up, a
command's input ends, and whatever is left of the session after GRACE seconds is killed (its
process group).

Standard library only; Python 3.9+ (os.pidfd_open).  Kept small: it is sent with every exec
as its command line.
"""

import fcntl
import json
import os
import pwd
import select
import signal
import socket
import stat
import struct
import sys
import termios
import time

GRACE = 5.0
CLAIM = 30.0


def main():
    mode, spec = sys.argv[1], json.loads(sys.argv[2])
    pw = pwd.getpwnam(spec["user"])
    private = None
    if mode == "listen":
        try:
            private = rundir(pw)
        except OSError as exc:
            os.write(2, (exc.strerror or str(exc)).encode())
            return 1
        pid = os.fork()
        if pid:  # root stays only to remove her directory (in root's /run/dgw) at the end
            status = os.waitpid(pid, 0)[1]
            remove_rundir(private)
            return os.waitstatus_to_exitcode(status)
    os.initgroups(pw.pw_name, pw.pw_gid)
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    if mode == "unix":
        return relay_unix(spec["path"], pw.pw_uid)
    if mode == "listen":
        return listen(spec, private)
    if mode == "take":
        return take(spec["ctl"], spec["id"])
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name,
           "HOSTNAME": socket.gethostname()}
    env.update(spec.get("env") or {})
    try:
        os.chdir(spec.get("workdir") or pw.pw_dir)
    except OSError:
        os.chdir("/")
    return run(spec["argv"], env, spec.get("tty"), spec.get("rows", 24), spec.get("cols", 80))


class Frames:
    """Frames from fd 0; `eof` once the gateway is gone."""

    def __init__(self):
        self.buf = b""
        self.eof = False

    def read(self):
        data = os.read(0, 65536)
        if not data:
            self.eof = True
        self.buf += data
        out = []
        while len(self.buf) >= 5:
            n = struct.unpack(">I", self.buf[1:5])[0]
            if len(self.buf) < 5 + n:
                break
            out.append((self.buf[:1], self.buf[5:5 + n]))
            self.buf = self.buf[5 + n:]
        return out


def winsize(fd, rows, cols):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def run(argv, env, tty, rows, cols):
    if tty:
        master, slave = os.openpty()
        winsize(slave, rows, cols)
        child_in = slave
    else:
        child_in, master = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.setsid()
        if tty:
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
            os.dup2(slave, 1)
            os.dup2(slave, 2)
        else:
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
        os.dup2(child_in, 0)
        os.closerange(3, 1 << 16)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        try:
            os.execvpe(argv[0], argv, env)
        except OSError as exc:
            os.write(2, f"{argv[0]}: {exc.strerror}\n".encode())
            os._exit(127)
    os.close(child_in)
    # Output is relayed as frames on the exec's stdout, ended by the exit status and counts;
    # then the helper waits for the gateway's ack, so nothing the exec still holds can be cut
    # off by its end (see the module's doc).
    out = Output()
    out.put(b"b")
    if tty:
        sources = {master: b"o"}
    else:
        os.close(out_w)
        os.close(err_w)
        sources = {out_r: b"o", err_r: b"r"}
        for fd in sources:
            os.set_blocking(fd, False)
    # fd 2 (the exec's stderr) stays open, unused, until the helper exits: the runtime
    # (containerd's CRI exec) ends the exec's stdin as soon as its stdout or stderr ends, and
    # the helper would then never see the ack.
    os.set_blocking(master, False)
    pidfd = os.pidfd_open(pid)
    frames, pending, status, deadline = Frames(), b"", None, None
    input_open, eof_wanted = not tty, False  # a command's stdin is the pipe `master`
    while status is None or sources:
        rl = [pidfd] if status is None else []
        if not frames.eof and len(pending) < 1 << 20:
            rl.append(0)
        if out.room():
            rl += sources
        wl = [master] if pending and master >= 0 and (tty or input_open) else []
        if out.buf:
            wl.append(1)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        r, w, _ = select.select(rl, wl, [], timeout)
        if not r and not w and deadline is not None:  # grace is over: kill what is left
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            deadline = None
            for fd in sources:  # and its output: nobody reads it any more
                os.close(fd)
            if tty:
                master = -1
            sources.clear()
            out.gone, out.buf = True, b""
            continue
        if 1 in w:
            out.flush()
        if pidfd in r:
            status = os.waitpid(pid, 0)[1]
            continue
        for fd in [fd for fd in sources if fd in r]:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: every holder of the pty's other side is gone
                data = b""
            if not data:
                del sources[fd]
                if fd != master:
                    os.close(fd)
                elif master >= 0:
                    os.close(master)
                    master = -1
                continue
            out.put(sources[fd], data)
        if 0 in r:
            for kind, payload in frames.read():
                if kind == b"d":
                    pending += payload
                elif kind == b"e":
                    eof_wanted = not tty
                elif kind == b"s":
                    signum = getattr(signal, "SIG" + payload.decode(), None)
                    if signum is not None:
                        try:
                            os.kill(pid, signum)
                        except OSError:
                            pass
                elif kind == b"w" and tty and master >= 0:
                    rows, cols = payload.split()
                    try:
                        winsize(master, int(rows), int(cols))
                    except OSError:
                        pass
            if frames.eof and deadline is None:  # the gateway is gone: hang up / end input
                pending = b""
                if tty and master >= 0:
                    sources.pop(master, None)
                    os.close(master)
                    master = -1
                elif master >= 0:
                    os.close(master)
                    master = -1
                input_open = False
                deadline = time.monotonic() + GRACE
        if master >= 0 and master in w:
            try:
                pending = pending[os.write(master, pending):]
            except BlockingIOError:
                pass
            except OSError:  # the program closed its input
                pending = b""
        if eof_wanted and input_open and not pending:
            os.close(master)
            master, input_open = -1, False
    code = 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    out.put(b"x", f"{code} {out.sent[b'o']} {out.sent[b'r']}".encode())
    while out.buf and not out.gone:  # everything out, then the gateway's ack (or its end)
        r, w, _ = select.select([] if frames.eof else [0], [1], [], GRACE if frames.eof else None)
        if not r and not w:
            break
        if 0 in r:
            frames.read()
        out.flush()
    while not frames.eof and not out.gone:
        select.select([0], [], [])
        if any(kind == b"a" for kind, _ in frames.read()):
            break
    return code


class Output:
    """The exec's stdout as frames (``b`` begin, ``o`` stdout, ``r`` stderr, ``x`` "status
    stdout-bytes stderr-bytes"), written without blocking so input and signals are served
    while the gateway holds output back; ``gone`` once the exec's stdout is."""

    def __init__(self):
        self.buf = b""
        self.sent = {b"o": 0, b"r": 0}
        self.gone = False
        os.set_blocking(1, False)

    def room(self):  # small: each write copies what is left
        return len(self.buf) < 1 << 16

    def put(self, kind, data=b""):
        if kind in self.sent:
            self.sent[kind] += len(data)
        if not self.gone:
            self.buf += kind + struct.pack(">I", len(data)) + data
            self.flush()

    def flush(self):
        try:
            self.buf = self.buf[os.write(1, self.buf):]
        except BlockingIOError:
            pass
        except OSError:  # the exec's stdout is gone: so is the gateway
            self.buf, self.gone = b"", True


def write_all(fd, data):
    while data:
        try:
            data = data[os.write(fd, data):]
        except BlockingIOError:
            select.select([], [fd], [])


def relay_unix(path, uid):
    try:
        st = os.stat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(0, "not a socket")
        if st.st_uid != uid:
            raise OSError(0, "not your socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
    except OSError as exc:
        os.write(2, (exc.strerror or str(exc)).encode())
        return 1
    write_all(1, b"+")
    return relay(sock)


def relay(sock):
    """Her socket <-> the exec: framed input in, raw output out."""
    frames = Frames()
    while True:
        r, _, _ = select.select([0, sock], [], [])
        if sock in r:
            data = sock.recv(65536)
            if not data:
                return 0
            write_all(1, data)
        if 0 in r:
            for kind, payload in frames.read():
                if kind == b"d":
                    sock.sendall(payload)
                elif kind == b"e":
                    sock.shutdown(socket.SHUT_WR)
            if frames.eof:
                return 0


DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def rundir(pw):
    """A fresh 0700 directory of hers under /run/dgw (root's), made as root without following
    a link; its path."""
    run = os.open("/run", DIR)
    try:
        st = os.fstat(run)
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise OSError(0, "/run is not root's")
        try:
            os.mkdir("dgw", 0o755, dir_fd=run)
        except FileExistsError:
            pass
        base = os.open("dgw", DIR, dir_fd=run)
    finally:
        os.close(run)
    try:
        st = os.fstat(base)
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise OSError(0, "/run/dgw is not root's")
        token = os.urandom(8).hex()
        os.mkdir(token, 0o700, dir_fd=base)
        os.chown(token, pw.pw_uid, pw.pw_gid, dir_fd=base, follow_symlinks=False)
    finally:
        os.close(base)
    return "/run/dgw/" + token


def remove_rundir(path):
    """Her directory under /run/dgw and the files left in it, no link followed."""
    base = os.open("/run/dgw", DIR)
    try:
        name = os.path.basename(path)
        fd = os.open(name, DIR, dir_fd=base)
        try:
            for entry in os.listdir(fd):
                try:
                    os.unlink(entry, dir_fd=fd)
                except OSError:
                    pass
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=base)
    except OSError:
        pass
    finally:
        os.close(base)


def listen(spec, private):
    ctl_path = private + "/ctl"
    path = private + "/" + spec["name"] if spec.get("name") else ""
    pending = {}
    lsock = ctl = None
    try:
        try:
            if path:
                lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                lsock.bind(path)
            else:
                lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                lsock.bind(("127.0.0.1", int(spec["port"])))
            lsock.listen(64)
            ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            ctl.bind(ctl_path)
            ctl.listen(16)
        except OSError as exc:
            os.write(2, (exc.strerror or str(exc)).encode())
            return 1
        port = 0 if path else lsock.getsockname()[1]
        write_all(1, f"+{port} {path or '-'} {ctl_path}\n".encode())
        frames, serial = Frames(), 0
        while True:
            now = time.monotonic()
            for key in [k for k, (_, t) in pending.items() if now - t > CLAIM]:
                pending.pop(key)[0].close()
            r, _, _ = select.select([0, lsock, ctl], [], [], 1.0 if pending else None)
            if lsock in r:
                try:
                    conn, peer = lsock.accept()
                except OSError:
                    conn = None
                if conn is not None:
                    serial += 1
                    pending[str(serial)] = (conn, now)
                    host, pport = ("-", 0) if path else peer[:2]
                    write_all(1, f"c {serial} {host} {pport}\n".encode())
            if ctl in r:
                hand_over(ctl, pending)
            if 0 in r and (any(kind == b"e" for kind, _ in frames.read()) or frames.eof):
                return 0
    except OSError:  # the exec's output is gone: so is the gateway
        return 0
    finally:
        for conn, _ in pending.values():
            conn.close()
        for s in (lsock, ctl):
            if s is not None:
                s.close()
        for name in (path, ctl_path):  # the directory: root's part of the helper
            if name:
                try:
                    os.unlink(name)
                except OSError:
                    pass


def hand_over(ctl, pending):
    """One `take`: it names a pending connection and gets its descriptor."""
    try:
        client, _ = ctl.accept()
    except OSError:
        return
    try:
        client.settimeout(5)
        key = client.recv(64).decode(errors="replace").strip()
        item = pending.pop(key, None)
        if item is not None:
            socket.send_fds(client, [b"+"], [item[0].fileno()])
            item[0].close()
    except OSError:
        pass
    finally:
        client.close()


def take(ctl_path, key):
    try:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(10)
        client.connect(ctl_path)
        client.sendall(key.encode() + b"\n")
        _, fds, _, _ = socket.recv_fds(client, 1, 1)
        client.close()
        if not fds:
            raise OSError(0, "no such connection (closed or taken)")
        sock = socket.socket(fileno=fds[0])
        sock.setblocking(True)
    except OSError as exc:
        os.write(2, (exc.strerror or str(exc)).encode())
        return 1
    write_all(1, b"+")
    return relay(sock)


if __name__ == "__main__":
    sys.exit(main())
