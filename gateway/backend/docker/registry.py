"""The shared image cache: a registry mirror for every inner daemon, and images preloaded from
the host engine into each new one.

**Mirror.** gateway.yaml `registry_mirror` goes into every inner daemon's `registry-mirrors`
(dind-init writes it, with `insecure_registries`, into a daemon.json root owns; the gateway
passes both as environment).  When the mirror's host is the name of a container on the engine
(a registry the admin runs in a container, e.g. Debian's `docker-registry`), that container is
attached to each user network at the network's last address (a /28's .14) and her daemon is
given that address: the mirror is reached on her own network, at one address that only serves
the registry's port, and nothing else of the host becomes reachable (the host's own ports stay
where they were: a service on the host's loopback is out of reach).  The mirror container sees
every user network but routes none (no forwarding in its namespace): users still cannot reach
each other through it.  Any other host is passed on as it is (a mirror on the LAN, reached
like the internet).

**Preload.** Each image of `preload_images` that her new daemon lacks is streamed from the
host engine (`GET /images/get`, i.e. `docker save`) into `docker load` run *as her* in her
container, chunk by chunk (never all in memory), with a progress line at her login.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import quote

from .engine import DockerClient, DockerError

log = logging.getLogger("dind_gateway.backend.registry")

INNER_DOCKER_HOST = "unix:///var/run/docker.sock"
_CHUNK = 256 * 1024

Runner = Callable[[str, list[str]], Awaitable[tuple[int, bytes]]]


@dataclass(frozen=True)
class RegistryOptions:
    mirror: str | None = None  # http(s)://host[:port]; host may be a container's name
    insecure: tuple[str, ...] = ()
    preload: tuple[str, ...] = ()


def _split(url: str) -> tuple[str, str, str]:
    """http://host:port → ("http", "host", ":port")."""
    scheme, _, rest = url.partition("://")
    host, sep, port = rest.partition(":")
    return scheme, host, sep + port


def mirror_address(subnet: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """Where the mirror container sits on a user network: its last usable address."""
    return subnet.broadcast_address - 1


class Mirror:
    """Resolves the mirror URL per user network, attaching a mirror container if named."""

    def __init__(self, docker: DockerClient, options: RegistryOptions) -> None:
        self.docker = docker
        self.options = options
        self._warned = False

    async def _container(self) -> str | None:
        """The mirror's host, if it names a container on the engine."""
        if self.options.mirror is None:
            return None
        _, host, _ = _split(self.options.mirror)
        try:
            ipaddress.ip_address(host)
            return None
        except ValueError:
            pass
        info = await self.docker.inspect_container(host)
        if info is None:
            return None
        if not (info.get("State") or {}).get("Running") and not self._warned:
            self._warned = True
            log.warning("registry mirror container %s is not running", host)
        return host

    async def daemon_env(self, network: str) -> list[str]:
        """DGW_REGISTRY_MIRRORS / DGW_INSECURE_REGISTRIES for a container on `network`."""
        opts = self.options
        insecure = list(opts.insecure)
        mirrors = []
        if opts.mirror is not None:
            url = opts.mirror
            container = await self._container()
            if container is not None:
                scheme, _, port = _split(url)
                ip = await self.attach(container, network)
                url = f"{scheme}://{ip}{port}"
                if scheme == "http":  # plain HTTP on her own network
                    insecure.append(f"{ip}{port}")
            mirrors.append(url)
        env = []
        if mirrors:
            env.append("DGW_REGISTRY_MIRRORS=" + ",".join(mirrors))
        if insecure:
            env.append("DGW_INSECURE_REGISTRIES=" + ",".join(dict.fromkeys(insecure)))
        return env

    async def attach(self, container: str, network: str) -> str:
        """Connect the mirror container to a user network at mirror_address (idempotent)."""
        info = await self.docker.inspect_container(container) or {}
        nets = (info.get("NetworkSettings") or {}).get("Networks") or {}
        if network in nets and nets[network].get("IPAddress"):
            return nets[network]["IPAddress"]
        net = await self.docker.request("GET", f"/networks/{quote(network)}")
        subnet = ipaddress.IPv4Network(net["IPAM"]["Config"][0]["Subnet"])
        ip = str(mirror_address(subnet))
        await self.docker.request("POST", f"/networks/{quote(network)}/connect", body={
            "Container": container, "EndpointConfig": {"IPAMConfig": {"IPv4Address": ip}}},
            ok=(200, 201, 204))
        log.info("registry mirror %s attached to %s at %s", container, network, ip)
        return ip

    async def detach(self, network: str) -> None:
        """Before a user network is removed (purge): it has an endpoint of the mirror."""
        container = await self._container()
        if container is None:
            return
        try:
            await self.docker.request("POST", f"/networks/{quote(network)}/disconnect",
                                      body={"Container": container, "Force": True},
                                      ok=(200, 201, 204))
        except DockerError as exc:
            if exc.status not in (403, 404):  # 403: not connected
                raise


async def _image_chunks(docker: DockerClient, image: str) -> AsyncIterator[bytes]:
    """`docker save image` from the host engine, as a stream of chunks."""
    reader, writer = await docker._open()
    try:
        url = docker._url("/images/get", {"names": image})
        writer.write(docker._request_bytes("GET", url, None, {"Connection": "close"}))
        status, headers = await docker._read_head(reader)
        if status != 200:
            body = await docker._read_body(reader, headers)
            raise DockerError(status, body.decode(errors="replace").strip())
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    return
                left = size
                while left:
                    data = await reader.read(min(left, _CHUNK))
                    if not data:
                        raise DockerError(0, "image stream cut short")
                    left -= len(data)
                    yield data
                await reader.readexactly(2)
        else:
            while data := await reader.read(_CHUNK):
                yield data
    finally:
        writer.close()


async def preload(docker: DockerClient, container: str, user: str, images: tuple[str, ...],
                  run: Runner, progress: Callable[[str], None] | None) -> None:
    """Load each image of `images` her daemon does not have yet; failures are told, not
    fatal (her environment works without them)."""
    say = progress or (lambda _text: None)
    for image in images:
        code, _ = await run(user, ["docker", "image", "inspect", "--format", ".", image])
        if code == 0:
            continue
        try:
            info = await docker.request("GET", f"/images/{quote(image, safe='/:@')}/json")
        except DockerError as exc:
            log.warning("preload_images: %s is not on the host engine (%s)", image, exc.message)
            say(f"Image {image} could not be preloaded (not on the server).\n")
            continue
        size = (info.get("Size") or 0) / 2**20
        say(f"Loading image {image} ({size:.1f} MiB)…")
        t0 = time.monotonic()
        try:
            await _load(docker, container, user, image)
        except (DockerError, OSError, ConnectionError) as exc:
            log.warning("preload of %s into %s failed: %s", image, container, exc)
            say(" failed; please tell your admin.\n")
            continue
        code, _ = await run(user, ["docker", "image", "inspect", "--format", ".", image])
        if code != 0:
            log.warning("preload of %s into %s: docker load did not make it", image, container)
            say(" failed; please tell your admin.\n")
            continue
        elapsed = time.monotonic() - t0
        log.info("preloaded %s into %s in %.1f s", image, container, elapsed)
        say(f" done in {elapsed:.1f} s\n")


async def _load(docker: DockerClient, container: str, user: str, image: str) -> None:
    exec_id = await docker.exec_create(container, ["docker", "load", "-q"], tty=False,
                                       user=user, workdir="/",
                                       env=[f"DOCKER_HOST={INNER_DOCKER_HOST}"])
    stream = await docker.exec_start(exec_id, False)
    output: list[bytes] = []

    async def drain_output() -> None:
        while True:
            kind, data = await stream.read()
            if not kind:
                return
            output.append(data)

    reading = asyncio.create_task(drain_output())
    try:
        async for chunk in _image_chunks(docker, image):
            stream.write(chunk)
            await stream.drain()
        stream.write_eof()
        await reading
    finally:
        reading.cancel()
        stream.close()
    text = b"".join(output).decode(errors="replace").strip()
    log.debug("docker load of %s in %s: %s", image, container, text)

