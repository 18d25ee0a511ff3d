#!/bin/sh
# DIY baseline: sshd's `Subsystem sftp /path/diy-sftp.sh CONTAINER_PREFIX` (see diy-wrapper.sh).
set -u
user=${DIY_USER:?DIY_USER not set (authorized_keys environment=)}
exec docker exec -i -u "$user" -w "/home/$user" "$1-$user" /usr/libexec/sftp-server
