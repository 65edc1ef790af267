# Podman/Docker image for scalebox-base (same content as scalebox-base.def). No registry: the build context's
# rootfs/ is made offline by containers/rootfs.sh, as the directive below asks.
# scalebox-rootfs:
FROM scratch
COPY rootfs/ /
CMD ["/bin/sh"]
