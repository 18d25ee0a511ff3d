"""The Kubernetes backend: one DinD pod per user, two claims, a NetworkPolicy.

Per user, in one namespace, all labelled like the Docker backend's objects
(`dind-gateway.instance=<prefix>`, `dind-gateway.owner=<user>`):

- pod `<prefix>-<user>`: the DinD image, privileged (the only profile here, see README),
  no service-account token, `tini` as PID 1;
- claims `<prefix>-<user>-home` (on /home/<user>) and `<prefix>-<user>-docker` (on
  /var/lib/docker) from `storage_class`, or on hostPath volumes made and pre-bound here when
  `host_path` is set (single-node clusters);
- NetworkPolicy `<prefix>-<user>`: ingress only from pods with `gateway_labels`.

"Stopped" is "pod deleted, claims kept".  Every create tolerates 409 (another gateway made
it: it is used), every delete tolerates 404, so racing logins settle on one pod.  Readiness
is the inner dockerd's /_ping; a pod that fails or does not get ready is explained with its
events and the tail of its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import aiohttp

from ...aio import background
from ...observe.events import Events
from ..base import Backend, BackendError, EnvState, EnvStats, Limits, Listener, ProcessSpec
from .client import KubeClient, KubeError
from .process import KubeProcess, frame, helper_command, run_spec

log = logging.getLogger("dind_gateway.backend")

LABEL_MANAGED = "dind-gateway.managed"
LABEL_INSTANCE = "dind-gateway.instance"
LABEL_OWNER = "dind-gateway.owner"
LABEL_ROLE = "dind-gateway.role"
CONTAINER = "dind"
INNER_DOCKER_HOST = "unix:///var/run/docker.sock"
_LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}
# a container that will not come up by itself: say so at once instead of waiting
_STUCK = {"CrashLoopBackOff", "ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull",
          "InvalidImageName", "CreateContainerConfigError", "CreateContainerError",
          "RunContainerError"}
PROBE = ["sh", "-c", "curl -sf --max-time 2 --unix-socket /var/run/docker.sock "
         "http://docker/_ping >/dev/null 2>&1 || exit 1"]


class KubernetesBackend(Backend):
    """One DinD pod per user in `namespace`."""

    def __init__(self, kube: KubeClient, *, image: str, prefix: str, namespace: str,
                 profile: str = "privileged", ready_timeout: float = 60.0,
                 events: Events | None = None, storage_class: str | None = None,
                 host_path: str | None = None, home_size: int = 10 << 30,
                 docker_size: int = 20 << 30, image_pull_policy: str = "IfNotPresent",
                 node_selector: dict[str, str] | None = None,
                 gateway_labels: dict[str, str] | None = None) -> None:
        if profile != "privileged":
            raise ValueError(f"security_profile {profile!r} is not available on Kubernetes "
                             "(only 'privileged'; see README)")
        self.kube = kube
        self.image = image
        self.prefix = prefix
        self.ns = namespace
        self.profile = profile
        self.ready_timeout = ready_timeout
        self.events = events or Events()
        self.storage_class = storage_class
        self.host_path = host_path
        self.sizes = {"home": home_size, "docker": docker_size}
        self.pull_policy = image_pull_policy
        self.node_selector = dict(node_selector or {})
        self.gateway_labels = dict(gateway_labels or {})
        self._locks: dict[str, asyncio.Lock] = {}
        self._ready: dict[str, tuple[str, str]] = {}  # pod uid + start time seen ready

    # --- names and paths ------------------------------------------------------------------

    def pod_name(self, user: str) -> str:
        return f"{self.prefix}-{user}"

    container_name = pod_name

    def claim_names(self, user: str) -> dict[str, str]:
        return {"home": f"{self.prefix}-{user}-home", "docker": f"{self.prefix}-{user}-docker"}

    def labels(self, user: str, **extra: str) -> dict[str, str]:
        return {LABEL_MANAGED: "true", LABEL_INSTANCE: self.prefix, LABEL_OWNER: user, **extra}

    def _path(self, kind: str, name: str = "") -> str:
        group = "/apis/networking.k8s.io/v1" if kind == "networkpolicies" else "/api/v1"
        base = f"{group}/namespaces/{self.ns}/{kind}"
        return f"{base}/{name}" if name else base

    def _lock(self, user: str) -> asyncio.Lock:
        return self._locks.setdefault(user, asyncio.Lock())

    # --- state ----------------------------------------------------------------------------

    async def _pod(self, user: str) -> dict[str, Any] | None:
        return await self._call(self.kube.get(self._path("pods", self.pod_name(user))))

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except KubeError as exc:
            raise BackendError("The cluster did not answer as expected; please tell your "
                               "admin.", str(exc), "kubernetes") from exc

    async def inspect(self, user: str) -> EnvState:
        pod = await self._pod(user)
        if pod is not None:
            return self._state(user, pod)
        claim = await self._call(self.kube.get(self._path(
            "persistentvolumeclaims", self.claim_names(user)["home"])))
        if claim is not None:
            return EnvState(user=user, exists=True, status="stopped")
        return EnvState(user=user, exists=False)

    def _state(self, user: str, pod: dict[str, Any]) -> EnvState:
        meta, status = pod.get("metadata", {}), pod.get("status", {})
        cs = next((c for c in status.get("containerStatuses") or []
                   if c.get("name") == CONTAINER), {})
        running = (cs.get("state") or {}).get("running")
        phase = status.get("phase", "Pending")
        if meta.get("deletionTimestamp"):
            phase, running = "Terminating", None
        limits = ((pod.get("spec", {}).get("containers") or [{}])[0].get("resources") or {}
                  ).get("limits") or {}
        return EnvState(user=user, exists=True, running=bool(running),
                        container_id=meta.get("uid", ""),
                        started_at=(running or {}).get("startedAt", ""),
                        ip=status.get("podIP", ""), status=phase.lower(),
                        limits=Limits(cpus=_cpus(limits.get("cpu")),
                                      memory=_bytes(limits.get("memory"))))

    async def list_environments(self) -> list[EnvState]:
        selector = {"labelSelector": f"{LABEL_INSTANCE}={self.prefix}"}
        pods = await self._call(self.kube.request("GET", self._path("pods"), query=selector))
        claims = await self._call(self.kube.request(
            "GET", self._path("persistentvolumeclaims"),
            query={"labelSelector": f"{LABEL_INSTANCE}={self.prefix},{LABEL_ROLE}=home"}))
        out: dict[str, EnvState] = {}
        for pod in pods.get("items", []):
            user = (pod["metadata"].get("labels") or {}).get(LABEL_OWNER)
            if user and pod["metadata"]["name"] == self.pod_name(user):
                out[user] = self._state(user, pod)
        for claim in claims.get("items", []):
            user = (claim["metadata"].get("labels") or {}).get(LABEL_OWNER)
            if user and user not in out:
                out[user] = EnvState(user=user, exists=True, status="stopped")
        return sorted(out.values(), key=lambda s: s.user)

    # --- lifecycle ------------------------------------------------------------------------

    async def ensure(self, user: str, limits: Limits,
                     progress: Callable[[str], None] | None = None) -> EnvState:
        async with self._lock(user):
            pod = await self._pod(user)
            state = self._state(user, pod) if pod else EnvState(user=user, exists=False)
            if state.running and self._ready.get(user) == (state.container_id,
                                                          state.started_at):
                return state
            t0 = time.monotonic()
            announce = progress if not state.running else None
            if announce:
                announce("Starting your Docker environment…")
            if pod is not None and (state.status in ("terminating", "succeeded", "failed")):
                await self._delete_pod(user, grace=0 if state.status != "terminating" else None)
                pod = None
            if pod is None:
                created = await self._create(user, limits)
                if created:
                    self.events.emit("container.create", user=user,
                                     container=self.pod_name(user))
            state = await self._wait_ready(user)
            self._ready[user] = (state.container_id, state.started_at)
            self._ready_now(user, self.pod_name(user), state, t0, announce)
            return state

    async def stop(self, user: str, *, unless: Callable[[], bool] | None = None) -> bool:
        async with self._lock(user):
            if unless is not None and unless():
                return False
            self._ready.pop(user, None)
            t0 = time.monotonic()
            if not await self._delete_pod(user, grace=20):
                return False
        self.events.emit("container.stop", user=user, container=self.pod_name(user),
                         duration=round(time.monotonic() - t0, 3))
        return True

    async def purge(self, user: str) -> None:
        """Pod, claims, policy and (host_path mode) the volumes' objects.  With host_path
        the files stay on the node: nothing in the cluster deletes a hostPath directory."""
        async with self._lock(user):
            self._ready.pop(user, None)
            await self._delete_pod(user, grace=0)
            for claim in self.claim_names(user).values():
                await self._call(self.kube.delete(self._path("persistentvolumeclaims", claim)))
                if self.host_path:
                    await self._call(self.kube.delete(f"/api/v1/persistentvolumes/"
                                                      f"{self._pv_name(claim)}"))
            await self._call(self.kube.delete(self._path("networkpolicies",
                                                         self.pod_name(user))))
        self.events.emit("container.purge", user=user)

    async def _delete_pod(self, user: str, grace: int | None) -> bool:
        """Delete and wait until the pod is gone; False when there was none."""
        name = self.pod_name(user)
        deleted = await self._call(self.kube.delete(self._path("pods", name), grace=grace))
        deadline = time.monotonic() + max(self.ready_timeout, (grace or 30) + 30)
        delay = 0.1
        while await self._pod(user) is not None:
            if time.monotonic() > deadline:
                raise BackendError("Your environment did not stop in time; try again.",
                                   f"pod {name} still there after delete", "stop-timeout")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        return deleted

    async def _create(self, user: str, limits: Limits) -> bool:
        """Claims (and their volumes), policy and pod; whatever exists is kept.  True when
        this call created the pod."""
        for role, claim in self.claim_names(user).items():
            if self.host_path:
                await self._call(self.kube.create("/api/v1/persistentvolumes",
                                                  self._pv(user, role, claim)))
            await self._call(self.kube.create(self._path("persistentvolumeclaims"),
                                              self._claim(user, role, claim)))
        await self._call(self.kube.create(self._path("networkpolicies"), self._policy(user)))
        if self.host_path:
            await self._claims_bound(user)
        try:
            created = await self.kube.create(self._path("pods"), self._pod_spec(user, limits))
        except KubeError as exc:
            raise BackendError(f"Your environment could not be created: {exc.message}",
                               str(exc), "create-failed") from exc
        if created:
            log.info("created pod %s/%s", self.ns, self.pod_name(user))
        return created

    async def _claims_bound(self, user: str) -> None:
        """Pre-bound claims bind within a second; a pod made before that is found
        unschedulable and retried only after the scheduler's back-off (~15 s here)."""
        deadline = time.monotonic() + self.ready_timeout
        delay = 0.05
        for claim in self.claim_names(user).values():
            while True:
                obj = await self._call(self.kube.get(self._path("persistentvolumeclaims",
                                                                claim)))
                if (obj or {}).get("status", {}).get("phase") == "Bound":
                    break
                if time.monotonic() > deadline:
                    raise BackendError("Your storage could not be prepared; please tell your "
                                       "admin.", f"claim {claim} not bound", "storage")
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 0.5)

    def _pv_name(self, claim: str) -> str:
        return f"{self.ns}-{claim}"

    def _pv(self, user: str, role: str, claim: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": self._pv_name(claim), "labels": self.labels(user, **{
                LABEL_ROLE: role})},
            "spec": {
                "capacity": {"storage": str(self.sizes[role])},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "hostPath": {"path": f"{self.host_path}/{self.ns}/{claim}",
                             "type": "DirectoryOrCreate"},
                "claimRef": {"namespace": self.ns, "name": claim},
            },
        }

    def _claim(self, user: str, role: str, claim: str) -> dict[str, Any]:
        spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"],
                                "resources": {"requests": {"storage": str(self.sizes[role])}}}
        if self.host_path:
            spec["storageClassName"] = ""
            spec["volumeName"] = self._pv_name(claim)
        elif self.storage_class:
            spec["storageClassName"] = self.storage_class
        return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim, "labels": self.labels(user, **{LABEL_ROLE: role})},
                "spec": spec}

    def _policy(self, user: str) -> dict[str, Any]:
        """Ingress only from the gateway's pods (exec and port-forward do not need it: they
        enter through the kubelet; this keeps other users' pods out)."""
        return {
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": self.pod_name(user), "labels": self.labels(user)},
            "spec": {
                "podSelector": {"matchLabels": {LABEL_INSTANCE: self.prefix,
                                                LABEL_OWNER: user}},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"podSelector": {"matchLabels": self.gateway_labels}}]}],
            },
        }

    def _pod_spec(self, user: str, limits: Limits) -> dict[str, Any]:
        claims = self.claim_names(user)
        res: dict[str, Any] = {}
        if limits.cpus:
            res.setdefault("limits", {})["cpu"] = f"{int(limits.cpus * 1000)}m"
        if limits.memory:
            res.setdefault("limits", {})["memory"] = str(limits.memory)
        if res:
            res["requests"] = {"cpu": "50m", "memory": "64Mi"}
            if limits.memory and limits.memory < 64 << 20:
                res["requests"]["memory"] = str(limits.memory)
        spec: dict[str, Any] = {
            "hostname": f"{user}-devbox",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 20,
            "containers": [{
                "name": CONTAINER,
                "image": self.image,
                "imagePullPolicy": self.pull_policy,
                "command": ["/usr/bin/docker-init", "--", "/usr/local/bin/dind-init"],
                "env": [{"name": "DGW_USER", "value": user},
                        {"name": "DGW_PROFILE", "value": self.profile}],
                "securityContext": {"privileged": True},
                "resources": res,
                "volumeMounts": [
                    {"name": "home", "mountPath": f"/home/{user}"},
                    {"name": "docker", "mountPath": "/var/lib/docker"},
                ],
            }],
            "volumes": [
                {"name": "home", "persistentVolumeClaim": {"claimName": claims["home"]}},
                {"name": "docker", "persistentVolumeClaim": {"claimName": claims["docker"]}},
            ],
        }
        if self.node_selector:
            spec["nodeSelector"] = self.node_selector
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": self.pod_name(user), "labels": self.labels(user)},
                "spec": spec}

    async def _wait_ready(self, user: str) -> EnvState:
        """Until the inner dockerd answers /_ping; a pod that fails, or whose container cannot
        start, is reported at once with its events and log tail."""
        name = self.pod_name(user)
        deadline = time.monotonic() + self.ready_timeout
        delay = 0.05
        while True:
            pod = await self._pod(user)
            if pod is None:
                raise BackendError("Your environment was removed while starting; try again.",
                                   f"pod {name} vanished during start", "crashed")
            state = self._state(user, pod)
            stuck = _stuck_reason(pod)
            if state.status in ("failed", "succeeded") or stuck:
                why = await self._explain(user)
                raise BackendError(
                    f"Your environment failed to start ({stuck or state.status}).\n{why}",
                    f"pod {name} {stuck or state.status}", "crashed")
            if state.running:
                try:
                    if (await self.run(user, PROBE))[0] == 0:
                        return state
                except BackendError as exc:
                    log.debug("readiness probe of %s: %s", name, exc)
            if time.monotonic() > deadline:
                why = await self._explain(user)
                raise BackendError(
                    f"Your Docker daemon did not become ready within {self.ready_timeout:.0f} s."
                    f"\n{why}", f"pod {name} not ready after {self.ready_timeout} s", "timeout")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    async def _explain(self, user: str) -> str:
        """The pod's recent events and the last lines of its log, for the user and the log."""
        name = self.pod_name(user)
        lines = []
        try:
            events = await self.kube.request("GET", self._path("events"), query={
                "fieldSelector": f"involvedObject.name={name},involvedObject.kind=Pod"})
            items = sorted(events.get("items", []),
                           key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
            for e in items[-6:]:
                lines.append(f"  event: {e.get('reason')}: {e.get('message', '').strip()}")
        except KubeError as exc:
            lines.append(f"  (events unavailable: {exc.message})")
        try:
            tail = await self.kube.request("GET", self._path("pods", name) + "/log",
                                           query={"container": CONTAINER, "tailLines": "15"},
                                           raw=True)
            lines += ["  log: " + line for line in tail.rstrip().splitlines()] or ["  (no log)"]
        except KubeError as exc:
            lines.append(f"  (log unavailable: {exc.message})")
        return "\n".join(lines)

    # --- processes --------------------------------------------------------------------------

    async def _exec(self, user: str, command: list[str]) -> aiohttp.ClientWebSocketResponse:
        query = [("container", CONTAINER), ("stdin", "true"), ("stdout", "true"),
                 ("stderr", "true"), ("tty", "false")] + [("command", c) for c in command]
        try:
            return await self.kube.websocket(self._path("pods", self.pod_name(user)) + "/exec",
                                             query)
        except KubeError as exc:
            if exc.status in (400, 404):
                raise BackendError("your environment is not running", str(exc),
                                   "not-running") from exc
            raise BackendError("The cluster refused to start your session; please tell your "
                               "admin.", str(exc), "exec-failed") from exc

    async def start(self, spec: ProcessSpec) -> KubeProcess:
        ws = await self._exec(spec.user, helper_command("run", run_spec(spec)))
        return KubeProcess(ws, tty=spec.tty)

    async def open_connection(self, user: str, port: int) -> socket.socket:
        """Through the API server's port-forward into the pod's network namespace: her
        loopback included.  A relay task joins the websocket to one end of a socket pair."""
        try:
            ws = await self.kube.websocket(
                self._path("pods", self.pod_name(user)) + "/portforward", [("ports", str(port))])
        except KubeError as exc:
            raise BackendError(f"connection to port {port} failed: {exc.message}", str(exc),
                               "connect-failed") from exc
        ours, theirs = _tcp_pair()
        background(_relay_portforward(ws, ours, user, port))
        return theirs

    async def open_unix(self, user: str, path: str) -> socket.socket:
        return await self._relayed(user, "unix", {"user": user, "path": path},
                                   f"connect to {path}")

    async def _relayed(self, user: str, mode: str, spec: dict[str, object],
                       what: str) -> socket.socket:
        """A socket joined to a helper's relay (`unix`, `take`): once it says `+`."""
        ws = await self._exec(user, helper_command(mode, spec))
        first = await _first_output(ws)
        if first[0] != 1 or not first[1].startswith(b"+"):
            await ws.close()
            text = first[1].decode(errors="replace").strip() or "refused"
            raise BackendError(f"cannot {what}: {text}", f"{user}: {mode} {what}: {text}",
                               "connect-failed")
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        background(_relay_exec(ws, ours, first[1][1:]))
        return theirs

    async def listen_tcp(self, user: str, port: int) -> Listener:
        """127.0.0.1:port in her pod, by the helper's `listen` mode (see KubeListener)."""
        return await self._listen(user, {"user": user, "port": port}, f"port {port}")

    async def listen_unix(self, user: str, name: str) -> Listener:
        return await self._listen(user, {"user": user, "name": name}, "socket")

    async def _listen(self, user: str, spec: dict[str, object], what: str) -> Listener:
        ws = await self._exec(user, helper_command("listen", spec))
        out, err = b"", b""
        try:
            while b"\n" not in out:
                msg = await ws.receive()
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break
                if msg.data[:1] == b"\x01":
                    out += msg.data[1:]
                elif msg.data[:1] == b"\x02":
                    err += msg.data[1:]
        except (OSError, aiohttp.ClientError) as exc:
            err = err or str(exc).encode()
        line, _, rest = out.partition(b"\n")
        fields = line.decode(errors="replace").split()
        if len(fields) != 3 or not fields[0].startswith("+"):
            await ws.close()
            text = err.decode(errors="replace").strip() or "the listener did not start"
            raise BackendError(f"cannot listen on {what}: {text}",
                               f"{user}: listen {what}: {text}", "listen-failed")
        return KubeListener(self, user, ws, port=int(fields[0][1:]),
                            path="" if fields[1] == "-" else fields[1], ctl=fields[2],
                            pending=rest)

    def aliases(self, user: str) -> set[str]:
        return _LOCAL_NAMES | {f"{user}-devbox", self.pod_name(user), "devbox"}

    def environment(self, user: str) -> dict[str, str]:
        return {"DOCKER_HOST": INNER_DOCKER_HOST}

    async def has_workloads(self, user: str) -> bool:
        code, out = await self.run(user, ["sh", "-c", "DOCKER_HOST=" + INNER_DOCKER_HOST +
                                          " timeout 10 docker ps -q | head -1"])
        return code == 0 and bool(out.strip())

    async def update_limits(self, user: str, limits: Limits) -> None:
        """A pod's resources cannot change while it runs before Kubernetes 1.27 (in-place
        resize): the new caps apply from her next start (stop or restart)."""
        state = await self.inspect(user)
        if state.running and (state.limits.cpus, state.limits.memory) != (limits.cpus,
                                                                          limits.memory):
            log.info("limits of %s change at her next start (a running pod's resources are "
                     "fixed on this cluster)", user)

    async def stats(self, user: str) -> EnvStats:
        """Uptime and limit from the pod; usage from its own cgroup (no metrics API needed)."""
        state = await self.inspect(user)
        out = EnvStats()
        if not state.running:
            return out
        out.uptime = _uptime(state.started_at)
        out.mem_limit = state.limits.memory
        with contextlib.suppress(BackendError, ValueError):
            code, text = await self.run(user, ["sh", "-c",
                                               "cat /sys/fs/cgroup/memory.current "
                                               "/sys/fs/cgroup/pids.current"])
            if code == 0:
                mem, pids = text.split()[:2]
                out.mem_bytes, out.pids = int(mem), int(pids)
        return out

    async def health(self) -> str:
        t0 = time.monotonic()
        try:
            version = await self.kube.request("GET", "/version")
        except KubeError as exc:
            raise BackendError("the cluster failed", str(exc), "kubernetes") from exc
        return (f"ok (kubernetes {version.get('gitVersion', '?')} answered in "
                f"{time.monotonic() - t0:.3f} s)")

    async def close(self) -> None:
        await self.kube.close()


class KubeListener(Listener):
    """A listener in her pod: the helper's `listen` mode, run over one exec that lives as
    long as the listener.

    The helper accepts in the pod and says `c ID HOST PORT` on the exec's stdout; each such
    connection is fetched with a second exec (`take`: the descriptor itself, passed over a
    control socket in her private directory) and relayed like `open_unix`.  One exec per
    connection instead of multiplexing them over the listener's stream: each connection has
    its stream's own flow control (a slow one stalls no other, no window protocol of ours
    on v4's channels), and the relay is the one `ssh -L` to a socket path already uses; the
    cost is an exec's set-up per connection (~60 ms), small next to what `-R` and the agent
    carry.  `close` ends the exec: the helper stops listening and removes its files; if the
    exec ends on its own (pod stopped), `accept` raises.
    """

    def __init__(self, backend: KubernetesBackend, user: str,
                 ws: aiohttp.ClientWebSocketResponse, *, port: int, path: str, ctl: str,
                 pending: bytes) -> None:
        self._backend = backend
        self._user = user
        self._ws = ws
        self.port = port
        self.path = path
        self._ctl = ctl
        self._buf = pending
        self._ready: asyncio.Queue[tuple[socket.socket, tuple[str, int]] | None] = \
            asyncio.Queue()
        self._closed = False
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        """The helper's announcements; each connection is fetched in a task of its own."""
        try:
            while True:
                while b"\n" in self._buf:
                    line, _, self._buf = self._buf.partition(b"\n")
                    fields = line.decode(errors="replace").split()
                    if len(fields) == 4 and fields[0] == "c":
                        background(self._take(fields[1], fields[2], int(fields[3])))
                msg = await self._ws.receive()
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break
                if msg.data[:1] == b"\x01":
                    self._buf += msg.data[1:]
        except (OSError, aiohttp.ClientError, ValueError) as exc:
            log.info("listener of %s in her pod: %s", self._user, exc)
        finally:
            self._ready.put_nowait(None)

    async def _take(self, key: str, host: str, port: int) -> None:
        try:
            sock = await self._backend._relayed(
                self._user, "take", {"user": self._user, "ctl": self._ctl, "id": key},
                f"take connection {key}")
        except BackendError as exc:
            log.info("listener of %s: connection %s lost: %s", self._user, key, exc)
            return
        if self._closed:
            sock.close()
            return
        self._ready.put_nowait((sock, ("" if host == "-" else host, port)))

    async def _shutdown(self) -> None:
        """`e` first: the helper cleans up at once (a websocket close alone reaches it only
        once the connection is torn down, after aiohttp's close timeout)."""
        with contextlib.suppress(OSError, RuntimeError, aiohttp.ClientError):
            await self._ws.send_bytes(b"\x00" + frame(b"e"))
        await self._ws.close()

    async def accept(self) -> tuple[socket.socket, tuple[str, int]]:
        item = None if self._closed else await self._ready.get()
        if item is None:
            self._ready.put_nowait(None)  # for the next caller too
            raise BackendError("the listener in your environment ended",
                               f"{self._user}: listener exec ended", "listener-closed")
        return item

    def close(self) -> None:
        """End the exec: the helper's input ends, it stops listening and removes its files."""
        if self._closed:
            return
        self._closed = True
        self._reader.cancel()
        self._ready.put_nowait(None)
        background(self._shutdown())
        while not self._ready.empty():
            item = self._ready.get_nowait()
            if item is not None:
                item[0].close()
        self._ready.put_nowait(None)


# --- helpers --------------------------------------------------------------------------------

def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected loopback TCP sockets (the contract promises a TCP socket: the SSH layer
    logs its peer address)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        theirs = socket.create_connection(server.getsockname())
        ours, _ = server.accept()
    for s in (ours, theirs):
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return ours, theirs


def _stuck_reason(pod: dict[str, Any]) -> str:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in _STUCK:
            return waiting["reason"]
        if cs.get("restartCount", 0) > 0 and (cs.get("lastState") or {}).get("terminated"):
            return "restarted after exit " + str(cs["lastState"]["terminated"].get("exitCode"))
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and \
                cond.get("reason") == "Unschedulable" and "unbound" not in cond.get("message",
                                                                                    ""):
            return "unschedulable: " + cond.get("message", "")
    return ""


async def _first_output(ws: aiohttp.ClientWebSocketResponse) -> tuple[int, bytes]:
    while True:
        msg = await ws.receive()
        if msg.type != aiohttp.WSMsgType.BINARY:
            return 0, b""
        if msg.data and msg.data[0] in (1, 2) and len(msg.data) > 1:
            return msg.data[0], msg.data[1:]


async def _relay_exec(ws: aiohttp.ClientWebSocketResponse, sock: socket.socket,
                      first: bytes) -> None:
    """Socket ↔ the helper's `unix` relay (framed input)."""
    loop = asyncio.get_running_loop()

    async def up() -> None:
        while True:
            data = await loop.sock_recv(sock, 65536)
            if not data:
                await ws.send_bytes(b"\x00" + frame(b"e"))
                return
            await ws.send_bytes(b"\x00" + frame(b"d", data))

    task = loop.create_task(up())
    try:
        if first:
            await loop.sock_sendall(sock, first)
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.BINARY or not msg.data:
                break
            if msg.data[0] == 1 and len(msg.data) > 1:
                await loop.sock_sendall(sock, msg.data[1:])
    except (OSError, aiohttp.ClientError):
        pass
    finally:
        task.cancel()
        sock.close()
        await ws.close()


async def _relay_portforward(ws: aiohttp.ClientWebSocketResponse, sock: socket.socket,
                             user: str, port: int) -> None:
    """Socket ↔ a port-forward websocket: channel 0 data, 1 errors; the first message on
    each channel is the port number (2 bytes), not data."""
    loop = asyncio.get_running_loop()
    seen = set()

    async def up() -> None:
        while True:
            data = await loop.sock_recv(sock, 65536)
            if not data:
                return  # v4 has no half-close: the server ends the stream
            await ws.send_bytes(b"\x00" + data)

    task = loop.create_task(up())
    try:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.BINARY or not msg.data:
                break
            channel, data = msg.data[0], msg.data[1:]
            if channel not in seen:
                seen.add(channel)
                data = data[2:]
            if not data:
                continue
            if channel == 0:
                await loop.sock_sendall(sock, data)
            elif channel == 1:
                log.info("port-forward to %s:%d: %s", user, port,
                         data.decode(errors="replace").strip())
                break
    except (OSError, aiohttp.ClientError):
        pass
    finally:
        task.cancel()
        sock.close()
        await ws.close()


def _cpus(text: str | None) -> float | None:
    if not text:
        return None
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


_UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6,
          "G": 10**9, "T": 10**12}


def _bytes(text: str | None) -> int | None:
    if not text:
        return None
    for unit, factor in _UNITS.items():
        if text.endswith(unit):
            return int(float(text[:-len(unit)]) * factor)
    return int(text)


def _uptime(started: str) -> float | None:
    if not started:
        return None
    try:
        t = datetime.fromisoformat(started.replace("Z", "+00:00"))
    except ValueError:
        return None
    return max(0.0, time.time() - t.timestamp())
