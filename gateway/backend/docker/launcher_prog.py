"""The session launcher: runs in her container, as her, and forks her non-terminal sessions.

Started once per container start by the gateway through `runc exec` (launcher.py), exactly as a
session would be: her uid, gid and groups, the container's namespaces, cgroup, capabilities,
seccomp filter, AppArmor profile, no_new_privs and rlimits.  What it forks inherits all of
that, so a session started here is started as `runc exec` would start it - without paying
runc's start-up (a Go runtime, ~40 ms of CPU) per session, and without a resident runc per
open session.

This file is her container's `python3 -I -S -` program, sent on its stdin: it imports nothing
of the gateway, and keeps to what Python 3.7 has.  It is her process like any other (she can
kill it, trace it or replace the python3 it runs on): the gateway trusts nothing it says
beyond her own sessions (launcher.py).

Protocol, one JSON object per SOCK_SEQPACKET message on fd 3:
  gateway -> launcher: {"op": "start", "id", "argv", "env" (list of K=V), "cwd"} with her
                       stdin, stdout and stderr pipe ends attached (SCM_RIGHTS);
                       {"op": "kill", "id", "sig"}
  launcher -> gateway: {"op": "ready", "pid"} once; {"op": "started", "id", "pid"};
                       {"op": "failed", "id", "errno", "error"} (nothing was started);
                       {"op": "exit", "id", "status"} (the raw wait status)
When the gateway's end closes, the launcher exits; her sessions keep running.
"""

import array
import errno
import json
import os
import select
import signal
import socket

SOCK_FD = 3
MAX_MESSAGE = 256 * 1024


def send(sock, msg):
    try:
        sock.send(json.dumps(msg).encode())
    except OSError:
        pass  # the gateway is gone: the next recv says so


def recv(sock):
    """(message or None, [fds]); (None, None) at the end."""
    fds = array.array("i")
    data, anc, flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(16 * fds.itemsize),
                                       socket.MSG_CMSG_CLOEXEC)
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    if not data and not anc:
        return None, None
    try:
        msg = json.loads(data.decode())
    except ValueError:
        msg = None
    return (msg if isinstance(msg, dict) else None), list(fds)


def child(msg, fds, report):
    """In the forked child: never returns."""
    try:
        os.setsid()
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)  # Python ignores the first two; execve keeps that
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        env = {}
        for item in msg["env"]:
            name, _, value = item.partition("=")
            env[name] = value
        os.chdir(msg["cwd"])
        os.execvpe(msg["argv"][0], msg["argv"], env)
    except OSError as exc:
        os.write(report, json.dumps([exc.errno or 0, str(exc)]).encode())
    except Exception as exc:  # noqa: BLE001 - a malformed request: say so, start nothing
        os.write(report, json.dumps([errno.EINVAL, repr(exc)]).encode())
    os._exit(127)


def start(sock, msg, fds, children):
    sid = msg.get("id")
    if len(fds) != 3 or not isinstance(msg.get("argv"), list) or not msg["argv"]:
        send(sock, {"op": "failed", "id": sid, "errno": errno.EINVAL, "error": "bad request"})
        return
    rd, wr = os.pipe()  # close-on-exec: EOF at her execve, or why it failed
    pid = os.fork()
    if pid == 0:
        os.close(rd)
        child(msg, fds, wr)
    os.close(wr)
    for fd in fds:
        os.close(fd)
    failure = b""
    while True:
        chunk = os.read(rd, 4096)
        if not chunk:
            break
        failure += chunk
    os.close(rd)
    if failure:
        os.waitpid(pid, 0)
        try:
            code, text = json.loads(failure.decode())
        except ValueError:
            code, text = errno.EIO, "unreadable failure"
        send(sock, {"op": "failed", "id": sid, "errno": code, "error": text})
        return
    children[pid] = sid
    send(sock, {"op": "started", "id": sid, "pid": pid})


def reap(sock, children):
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        sid = children.pop(pid, None)
        if sid is not None:
            send(sock, {"op": "exit", "id": sid, "status": status})


def main():
    sock = socket.socket(fileno=SOCK_FD)
    os.set_inheritable(SOCK_FD, False)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children = {}
    send(sock, {"op": "ready", "pid": os.getpid()})
    while True:
        try:
            ready, _, _ = select.select([sock, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            reap(sock, children)
        if sock in ready:
            msg, fds = recv(sock)
            if fds is None:
                return  # the gateway closed its end
            if msg is None:
                for fd in fds:
                    os.close(fd)
                continue
            if msg.get("op") == "start":
                start(sock, msg, fds, children)
                reap(sock, children)  # one that ended at once
            else:
                for fd in fds:
                    os.close(fd)
                if msg.get("op") == "kill":
                    for pid, sid in list(children.items()):
                        if sid == msg.get("id"):
                            try:
                                os.kill(pid, int(msg.get("sig")))
                            except (OSError, ValueError, TypeError):
                                pass


if __name__ == "__main__":
    main()
