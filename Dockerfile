# The rootfs of the pyoverlay managed plugin, for those who have a registry.
# It is the rootfs that `make plugin` (packaging/build-plugin) builds with
# debootstrap when there is none: Debian 12, its Python 3.11, a virtualenv in
# /opt/pyoverlay that config.json's entrypoint runs.
#
#   docker build -t pyoverlay-rootfs .
#   mkdir -p build/plugin/rootfs && cp config.json build/plugin/
#   id=$(docker create pyoverlay-rootfs)
#   docker export "$id" | tar -x -C build/plugin/rootfs && docker rm "$id"
#   docker plugin create REGISTRY/pyoverlay:TAG build/plugin
#   docker plugin push REGISTRY/pyoverlay:TAG
#
# and on each host: docker plugin install REGISTRY/pyoverlay:TAG (see README).
FROM debian:bookworm-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv nftables iproute2 wireguard-go \
    && rm -rf /var/lib/apt/lists/*

# Only what the package needs, so an edit to the tests does not rebuild it.
COPY setup.cfg pyproject.toml README.md /src/
COPY plugin /src/plugin
COPY driver /src/driver
COPY ops /src/ops
# The mkdir: the engine mounts its runtime directory (the socket) and the
# state directory there.
RUN python3 -m venv /opt/pyoverlay \
    && /opt/pyoverlay/bin/pip install --no-cache-dir --disable-pip-version-check /src \
    && rm -rf /src \
    && mkdir -p /run/docker/plugins /var/lib/pyoverlay /run/netns

# For `docker run` of the image itself; the plugin uses config.json's entrypoint.
ENTRYPOINT ["/opt/pyoverlay/bin/pyoverlay", "serve"]
