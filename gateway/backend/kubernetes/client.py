"""A narrow Kubernetes API client: JSON requests, and the exec / port-forward websockets.

Configuration (kubeconfig or the pod's service account, client certificates, tokens, CA) and
the TLS transport come from `kubernetes_asyncio`, the maintained asyncio client of the
Kubernetes API.  Its generated API classes are not used: the backend needs a dozen calls on
plain JSON, and its exec helper hard-codes the v4 channel protocol that cannot end stdin on
1.20 servers (hence the framed input of `pod_helper`).  Everything here speaks
``v4.channel.k8s.io``: one channel byte in front of each binary message.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp

log = logging.getLogger("dind_gateway.backend")

CHANNEL_PROTOCOL = "v4.channel.k8s.io"


async def _maybe(value: Any) -> Any:
    """kubernetes_asyncio made some configuration hooks coroutines over its versions."""
    return await value if inspect.isawaitable(value) else value


class KubeError(Exception):
    """An API answer other than the expected one."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class KubeClient:
    """One API server; the aiohttp session is made on first use (inside the running loop)."""

    def __init__(self, kubeconfig: Path | None, context: str | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.context = context
        self._api: Any = None
        self._lock = asyncio.Lock()

    async def _client(self) -> Any:
        async with self._lock:
            if self._api is None:
                from kubernetes_asyncio import client, config

                cfg = client.Configuration()
                if self.kubeconfig is None:
                    config.load_incluster_config(client_configuration=cfg)
                else:
                    await config.load_kube_config(config_file=str(self.kubeconfig),
                                                  context=self.context,
                                                  client_configuration=cfg)
                self._api = client.ApiClient(configuration=cfg)
            return self._api

    async def _session(self) -> tuple[aiohttp.ClientSession, str, dict[str, str]]:
        api = await self._client()
        cfg = api.configuration
        headers = {}
        if cfg.refresh_api_key_hook is not None:
            await _maybe(cfg.refresh_api_key_hook(cfg))
        for auth in (await _maybe(cfg.auth_settings())).values():
            if auth.get("in") == "header" and auth.get("value"):
                headers[auth["key"]] = auth["value"]
        return api.rest_client.pool_manager, cfg.host.rstrip("/"), headers

    async def request(self, method: str, path: str, *, body: Any = None,
                      query: dict[str, Any] | None = None, ok: tuple[int, ...] = (200, 201),
                      content_type: str = "application/json", raw: bool = False,
                      timeout: float = 30) -> Any:
        session, host, headers = await self._session()
        headers = {**headers, "Accept": "application/json"}
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body)
        try:
            async with session.request(method, host + path, data=data, params=query,
                                       headers=headers,
                                       timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                text = await resp.text()
                if resp.status not in ok:
                    try:
                        status = json.loads(text)
                        raise KubeError(resp.status, status.get("reason", ""),
                                        status.get("message", text[:200]))
                    except (ValueError, AttributeError):
                        raise KubeError(resp.status, "", text[:200]) from None
                if raw:
                    return text
                return json.loads(text) if text else {}
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise KubeError(0, "unreachable", f"{method} {path}: {exc!r}") from exc

    async def get(self, path: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return await self.request("GET", path)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, path: str, body: dict[str, Any]) -> bool:
        """True when created, False when it exists already (409: someone else made it)."""
        try:
            await self.request("POST", path, body=body)
            return True
        except KubeError as exc:
            if exc.status == 409:
                return False
            raise

    async def delete(self, path: str, grace: int | None = None) -> bool:
        """True when a delete was accepted, False when it was gone already."""
        body = None
        if grace is not None:
            body = {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": grace,
                    "propagationPolicy": "Background"}
        try:
            await self.request("DELETE", path, body=body, ok=(200, 202))
            return True
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise

    async def websocket(self, path: str,
                        query: list[tuple[str, str]]) -> aiohttp.ClientWebSocketResponse:
        """An exec / portforward websocket (v4 channel protocol)."""
        session, host, headers = await self._session()
        url = "wss" + host[len("https"):] if host.startswith("https") else "ws" + host[4:]
        try:
            return await session.ws_connect(url + path, params=query, headers=headers,
                                            protocols=(CHANNEL_PROTOCOL,), max_msg_size=0,
                                            autoping=True, compress=0)
        except aiohttp.WSServerHandshakeError as exc:
            raise KubeError(exc.status, "handshake", exc.message) from exc
        except aiohttp.ClientError as exc:
            raise KubeError(0, "unreachable", f"{path}: {exc!r}") from exc

    async def close(self) -> None:
        if self._api is not None:
            await self._api.close()
            self._api = None
