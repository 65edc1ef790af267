# Podman/Docker image for app-primes (same content as app-primes.def). No registry: the build context's
# rootfs/ is made offline by containers/rootfs.sh, as the directive below asks.
# scalebox-rootfs: bash
FROM scratch
COPY rootfs/ /
CMD ["/bin/sh"]
