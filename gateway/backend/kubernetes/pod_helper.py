"""Runs *inside* the user's pod (``python3 -I -c <this file> MODE SPEC``) for every exec.

Why: Kubernetes 1.20 speaks only version 4 of the websocket exec protocol, which has no way
to close a process's stdin (v5's close frame came in 1.29/1.30), and an exec has no user
option.  So the gateway sends its input *framed* on the exec's stdin and this helper, started
as root in the pod, drops to the user at once and then:

- ``run``: starts the program (in a pty of its own when asked) in a new session, as sshd does;
  frames carry input data, end of input, signals and window sizes; stdout/stderr are the
  exec's own (no copy), the exit status is the exec's (128 + n when killed by signal n).
- ``unix``: connects to a socket file of hers and relays it (``ssh -L`` to a socket path);
  first byte on stdout: ``+`` connected (else the reason on stderr, exit 1).

Frame: one type byte, a 4-byte big-endian length, the payload.  ``d`` data, ``e`` end of
input, ``s`` signal name, ``w`` "rows cols".  A real end of the exec's stdin means the
gateway went away: like sshd on a lost client, a pty is hung up, a command's input ends,
and whatever is left of the session after GRACE seconds is killed (its process group).

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


def main():
    mode, spec = sys.argv[1], json.loads(sys.argv[2])
    pw = pwd.getpwnam(spec["user"])
    os.initgroups(pw.pw_name, pw.pw_gid)
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    if mode == "unix":
        return relay_unix(spec["path"], pw.pw_uid)
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
    pid = os.fork()
    if pid == 0:
        os.setsid()
        if tty:
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
            os.dup2(slave, 1)
            os.dup2(slave, 2)
        os.dup2(child_in, 0)
        os.closerange(3, 1 << 16)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        try:
            os.execvpe(argv[0], argv, env)
        except OSError as exc:
            os.write(2, f"{argv[0]}: {exc.strerror}\n".encode())
            os._exit(127)
    os.close(child_in)
    if not tty:  # output goes straight to the exec's stdout/stderr
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 1)
        os.dup2(null, 2)
    os.set_blocking(master, False)
    pidfd = os.pidfd_open(pid)
    frames, pending, status, deadline = Frames(), b"", None, None
    input_open, eof_wanted = not tty, False  # a command's stdin is the pipe `master`
    while status is None or (tty and master >= 0):
        rl = [pidfd] if status is None else []
        if not frames.eof and len(pending) < 1 << 20:
            rl.append(0)
        if tty and master >= 0:
            rl.append(master)
        wl = [master] if pending and master >= 0 and (tty or input_open) else []
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        r, w, _ = select.select(rl, wl, [], timeout)
        if not r and not w and deadline is not None:  # grace is over: kill what is left
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            deadline = None
            continue
        if pidfd in r:
            status = os.waitpid(pid, 0)[1]
            continue
        if tty and master in r:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every holder of the pty's other side is gone
                data = b""
            if not data:
                os.close(master)
                master = -1
                continue
            write_all(1, data)
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
                if master >= 0:
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
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


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


if __name__ == "__main__":
    sys.exit(main())
