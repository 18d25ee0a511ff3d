"""Configuration: gateway.yaml and users.yaml, validated with file:line: field errors.

`tree` keeps YAML line marks, `convert` turns nodes into values (collecting every error),
`users` and `settings` are the two schemas.
"""

from ..auth import AuthorizedKey, parse_authorized_key
from .convert import Address, parse_address, parse_duration, parse_size
from .settings import ForwardRule, GatewayConfig, load_gateway_config, parse_gateway_config
from .tree import ConfigError, ConfigErrors
from .users import INHERIT, Inherit, User, UserDefaults, UsersConfig, load_users, parse_users

__all__ = [
    'Address',
    'AuthorizedKey',
    'ConfigError',
    'ConfigErrors',
    'ForwardRule',
    'GatewayConfig',
    'INHERIT',
    'Inherit',
    'User',
    'UserDefaults',
    'UsersConfig',
    'load_gateway_config',
    'load_users',
    'parse_address',
    'parse_authorized_key',
    'parse_duration',
    'parse_gateway_config',
    'parse_size',
    'parse_users',
]
