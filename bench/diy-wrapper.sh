#!/bin/sh
# DIY baseline of the benchmark: what an admin would write without dind-gateway.
# sshd runs this as its ForceCommand:  ForceCommand /path/diy-wrapper.sh CONTAINER_PREFIX
# The bench user comes from the key's environment="DIY_USER=name" in authorized_keys
# (sshd_config: PermitUserEnvironment DIY_USER); the container is CONTAINER_PREFIX-name.
set -u
user=${DIY_USER:?DIY_USER not set (authorized_keys environment=)}
container="$1-$user"

# ForceCommand also wraps subsystems: for `Subsystem sftp /path/diy-sftp.sh PREFIX` sshd puts
# that command line in SSH_ORIGINAL_COMMAND.  Hand it on.
case ${SSH_ORIGINAL_COMMAND:-} in
    "$(dirname "$0")/diy-sftp.sh "*) exec $SSH_ORIGINAL_COMMAND ;;
esac

if [ -n "${SSH_TTY:-}" ]; then
    exec docker exec -i -t -u "$user" -w "/home/$user" -e DOCKER_HOST=unix:///var/run/docker.sock \
        "$container" sh -c "${SSH_ORIGINAL_COMMAND:-bash -l}"
fi
exec docker exec -i -u "$user" -w "/home/$user" -e DOCKER_HOST=unix:///var/run/docker.sock \
    "$container" sh -c "${SSH_ORIGINAL_COMMAND:-bash -l}"
