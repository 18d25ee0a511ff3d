"""gateway.yaml's shared image cache settings, and the helpers behind `init` and the mirror."""

from __future__ import annotations

import ipaddress

import pytest

from gateway import share
from gateway.backend.docker.registry import mirror_address
from gateway.config import ConfigError, ConfigErrors, parse_gateway_config


def test_defaults_are_off() -> None:
    c = parse_gateway_config("")
    assert c.registry_mirror is None and c.insecure_registries == () and c.preload_images == ()


def test_values() -> None:
    c = parse_gateway_config("registry_mirror: http://dgw-mirror:5000/\n"
                             "insecure_registries: [registry.local:5000, 10.0.0.5]\n"
                             "preload_images: [debian:bookworm, hello-world]\n")
    assert c.registry_mirror == "http://dgw-mirror:5000"
    assert c.insecure_registries == ("registry.local:5000", "10.0.0.5")
    assert c.preload_images == ("debian:bookworm", "hello-world")


@pytest.mark.parametrize("text, line, field", [
    ("registry_mirror: ftp://x\n", 1, "registry_mirror"),
    ("registry_mirror: http://x/path\n", 1, "registry_mirror"),
    ('registry_mirror: "http://x\\",\\"y"\n', 1, "registry_mirror"),
    ("\ninsecure_registries: [ok:5000, 'bad host']\n", 2, "insecure_registries[1]"),
    ("insecure_registries: registry.local\n", 1, "insecure_registries"),
    ("preload_images: ['two words']\n", 1, "preload_images[0]"),
])
def test_refused_with_line_and_field(text: str, line: int, field: str) -> None:
    with pytest.raises((ConfigError, ConfigErrors)) as info:
        parse_gateway_config(text, "gateway.yaml")
    assert f"gateway.yaml:{line}: {field}:" in str(info.value), str(info.value)


def test_mirror_sits_at_the_last_address_of_a_user_network() -> None:
    assert str(mirror_address(ipaddress.IPv4Network("10.213.0.112/28"))) == "10.213.0.126"


def test_data_sets_of_a_checkout() -> None:
    assert (share.path("dind") / "dind-init").is_file()
    assert (share.path("config") / "gateway.yaml").is_file()
    assert (share.path("packaging") / "dind-gateway.service").is_file()
    with pytest.raises(KeyError):
        share.path("nope")
