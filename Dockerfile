# The gateway itself.  With a registry and PyPI:  docker build -t dind-gateway/gateway .
# Offline (no registry, no network in the build): scripts/build-gateway-image.sh uses the
# debootstrap'ed Debian base from scripts/build-images.sh and wheels built on the host.
# Run it next to the host engine (it drives the engine; user containers never get the socket):
#   docker run -d --name dind-gateway --network host \
#     -v /var/run/docker.sock:/var/run/docker.sock \
#     -v /srv/dind-gateway/config:/etc/dind-gateway:ro \
#     -v dind-gateway-state:/var/lib/dind-gateway dind-gateway/gateway
# --network host lets `ssh -L` reach the per-user bridge networks.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
# Offline: DGW_PIP_ARGS="--no-index --find-links=/src/build/wheels" DGW_PIP_SPEC=dind-gateway.
# (Not named PIP_*: pip would read those as its own options, e.g. PIP_TARGET as --target.)
ARG DGW_PIP_ARGS=""
ARG DGW_PIP_SPEC=/src

RUN python3 -m venv /opt/dind-gateway
COPY . /src
RUN /opt/dind-gateway/bin/pip install --no-cache-dir ${DGW_PIP_ARGS} ${DGW_PIP_SPEC} && rm -rf /src

ENV PATH=/opt/dind-gateway/bin:$PATH \
    DIND_GATEWAY_CONFIG=/etc/dind-gateway/gateway.yaml
VOLUME /var/lib/dind-gateway
EXPOSE 2222
STOPSIGNAL SIGTERM
ENTRYPOINT ["dind-gateway"]
CMD ["serve"]
